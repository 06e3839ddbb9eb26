// The CLI's backend when no daemon answers: core, in this process. Loaded only then
// (a command that goes through the daemon never needs it). The short commands (ls,
// exec, eval, files, ping, kill) load only core's sandbox-access entry; the rest load
// all of core when they run (\`core()\`).
const core = () => import("@forkd/core");

import type { AdmissionLedger } from "@forkd/core";
import { ForkdError } from "@forkd/core/errors";
import { apiSandboxView, branchesBySource, connectSandbox, getSandbox, killSandbox, listSandboxes } from "@forkd/core/sandbox-access";
import type { Backend, BranchRow, ExecArgs, FilesArgs, SnapshotArgs } from "./backend-types.js";
import { forkRowOf } from "./fork-row.js";

/**
 * Admission without a daemon: this process's own ledger, with the daemon's default
 * limits. It holds no other work, so it checks the fork against what the host has
 * now, and refuses (over_limit) what the daemon would refuse on an idle host.
 */
async function directAdmission(): Promise<AdmissionLedger> {
  const { AdmissionLedger, admissionLimits } = await core();
  return new AdmissionLedger(admissionLimits({ maxSandboxes: 1000, maxBranches: 4 }));
}

export class DirectBackend implements Backend {
  readonly kind = "direct" as const;

  async branch(id: string, a: { tag?: string; mode?: string; wait: boolean }): Promise<BranchRow> {
    if (!a.wait) {
      throw new ForkdError(
        "bad_request",
        "--no-wait needs the daemon (it finishes the snapshot after this command exits); start `forkd daemon` or drop --no-wait",
      );
    }
    const { startBranch } = await core();
    const started = await startBranch(id, { tag: a.tag, mode: a.mode });
    const done = await started.done;
    if (done.status === "failed") throw new ForkdError("vm_start_failed", `BRANCH failed: ${done.error}`);
    return done;
  }

  async createSnapshot(a: SnapshotArgs) {
    const { apiSnapshotView, createSnapshot } = await core();
    return apiSnapshotView(
      await createSnapshot({
        tag: a.tag,
        image: a.image,
        warm: a.warm,
        warmEval: a.warmEval,
        memoryMib: a.memoryMib,
        vcpus: a.vcpus,
        onProgress: a.onProgress,
      }),
    );
  }
  async listSnapshots() {
    const { apiSnapshotView, listSnapshots } = await core();
    return (await listSnapshots()).map(apiSnapshotView);
  }
  async snapshotInfo(tag: string) {
    return (await core()).snapshotDetails(tag);
  }
  async compactSnapshot(tag: string, to: string) {
    const { apiSnapshotView, compactSnapshot } = await core();
    return apiSnapshotView(await compactSnapshot(tag, to));
  }
  async removeSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean }) {
    await (await core()).removeSnapshot(tag, opts);
  }
  async fork(a: Parameters<Backend["fork"]>[0]) {
    // The same policy as the daemon's POST /v1/sandboxes (core's fork-policy.ts): all children or none.
    const { childTimingsView, forkAllOrNothing } = await core();
    const children = await forkAllOrNothing({
      tag: a.tag,
      n: a.n,
      memoryLimitMib: a.memoryLimitMib,
      cpuLimit: a.cpuLimit,
      network: a.network,
      ...(a.allowOut?.length ? { allowOut: a.allowOut } : {}),
      ...(a.denyOut?.length ? { denyOut: a.denyOut } : {}),
      concurrency: a.concurrency,
      onChild: a.onChild,
      admission: await directAdmission(),
    });
    return children.map((c) => forkRowOf({ id: c.id, timings: childTimingsView(c) }));
  }
  async listSandboxes(opts: { pool?: boolean } = {}) {
    const bySource = branchesBySource();
    return listSandboxes()
      .filter((sb) => opts.pool || !sb.pool)
      .map((sb) => apiSandboxView(sb, bySource));
  }
  async listPools() {
    return (await core()).listPools();
  }
  async forkLive(id: string, a: { n: number; tag?: string; concurrency?: number }) {
    const started = performance.now();
    const { childTimingsView, forkLiveAllOrNothing } = await core();
    const result = await forkLiveAllOrNothing(id, {
      n: a.n,
      ...(a.tag ? { tag: a.tag } : {}),
      concurrency: a.concurrency,
      admission: await directAdmission(),
    });
    // Without a daemon this process is the writer: the snapshot is registered before it exits.
    await result.register();
    return {
      tag: result.tag,
      source_pause_ms: result.pauseMs,
      capture_ready_ms: result.captureReadyAt - started,
      total_ms: performance.now() - started,
      captured_pages: result.capturedPages,
      children: result.children.map((c) => forkRowOf({ id: c.id, timings: childTimingsView(c) })),
    };
  }
  private async withAgent<T>(id: string, work: (agent: Awaited<ReturnType<typeof connectSandbox>>) => Promise<T>): Promise<T> {
    getSandbox(id);
    const agent = await connectSandbox(id);
    try {
      return await work(agent);
    } finally {
      agent.close();
    }
  }
  exec(id: string, a: ExecArgs, onStdout: (d: Buffer) => void, onStderr: (d: Buffer) => void) {
    return this.withAgent(id, async (agent) => {
      const res = await agent.exec(
        {
          ...(a.argv ? { argv: a.argv } : { cmd: a.cmd }),
          ...(a.env ? { env: a.env } : {}),
          ...(a.cwd ? { cwd: a.cwd } : {}),
          ...(a.timeoutMs ? { timeoutMs: a.timeoutMs } : {}),
          ...(a.stdin ? { stdin: a.stdin.toString("base64") } : {}),
        },
        // Output goes straight to our stdout, not to memory: no cap.
        { onStdout, onStderr, maxOutputBytes: Number.POSITIVE_INFINITY },
      );
      return { exitCode: res.exitCode, signal: res.signal, timedOut: res.timedOut };
    });
  }
  eval(id: string, code: string, language?: "javascript" | "python") {
    return this.withAgent(id, async (agent) => {
      const res = await agent.eval(code, language ? { language } : {});
      return { value: res.value, type: res.type, duration_ms: res.durationMs, ...(res.stdout ? { stdout: res.stdout } : {}) };
    });
  }
  files(id: string, a: FilesArgs) {
    return this.withAgent(id, (agent) =>
      a.action === "write"
        ? agent.files<Record<string, unknown>>({ action: "write", path: a.path, data: (a.data ?? Buffer.alloc(0)).toString("base64") })
        : agent.files<Record<string, unknown>>({ action: a.action, path: a.path }),
    );
  }
  kill(id: string) {
    return killSandbox(id);
  }
  async ping(id: string) {
    const agent = await connectSandbox(id);
    try {
      const t0 = performance.now();
      const pong = await agent.ping({ timeoutMs: 10_000 });
      return { pong: true, version: pong.version, uptime_ms: pong.uptimeMs, hostname: pong.hostname, rtt_ms: performance.now() - t0 };
    } finally {
      agent.close();
    }
  }
  readonly workspaces = {
    list: async () => {
      const { apiWorkspaceView, listWorkspaces } = await core();
      return listWorkspaces().map(apiWorkspaceView);
    },
    create: async (name: string, snapshotTag: string, memoryLimitMib?: number) => {
      const { apiWorkspaceView, createWorkspace } = await core();
      return apiWorkspaceView(await createWorkspace({ name, snapshotTag, ...(memoryLimitMib !== undefined ? { memoryLimitMib } : {}) }));
    },
    suspend: async (name: string, diff: boolean) => {
      const { apiWorkspaceView, suspendWorkspace } = await core();
      return apiWorkspaceView(await suspendWorkspace(name, { diff }));
    },
    resume: async (name: string) => {
      const { apiWorkspaceView, resumeWorkspace } = await core();
      return apiWorkspaceView(await resumeWorkspace(name));
    },
    remove: async (name: string) => (await core()).deleteWorkspace(name),
  };
}
