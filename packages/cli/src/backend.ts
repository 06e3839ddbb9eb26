// The CLI talks to the daemon when one is reachable (it owns the sandboxes' agent
// connections then), and to core directly otherwise. One interface, two
// implementations, so every command prints the same either way.
import fs from "node:fs";
import path from "node:path";
import {
  type ApiSandbox,
  type ApiSnapshot,
  type ApiWorkspace,
  apiSandboxView,
  apiSnapshotView,
  apiWorkspaceView,
  type BranchStatus,
  branchesBySource,
  compactSnapshot,
  connectSandbox,
  createSnapshot,
  createWorkspace,
  deleteWorkspace,
  ERROR_STATUS,
  type ForkChildResult,
  ForkdError,
  forkdRunDir,
  forkLive,
  forkSandboxes,
  getSandbox,
  killSandbox,
  listPools,
  listSandboxes,
  listSnapshots,
  listWorkspaces,
  removeSnapshot,
  resumeWorkspace,
  type SnapshotDetails,
  snapshotDetails,
  startBranch,
  suspendWorkspace,
} from "@forkd/core";
import { Controller, ForkdApiError } from "@forkd/sdk";

export type ForkRow = {
  id: string;
  ok: boolean;
  vmm_start_ms?: number;
  restore_ms?: number;
  first_answer_ms?: number;
  total_ms?: number;
  error?: { code: string; message: string; console?: string };
};
export type { ApiWorkspace };
export type ExecArgs = { argv?: string[]; cmd?: string; env?: Record<string, string>; cwd?: string; timeoutMs?: number; stdin?: Buffer };
export type ExecOutcome = { exitCode: number | null; signal: string | null; timedOut: boolean };
export type FilesArgs = { action: "read" | "write" | "list"; path: string; data?: Buffer };
export type SnapshotArgs = {
  tag: string;
  image: string;
  warm: string[];
  warmEval: string[];
  memoryMib: number;
  vcpus: number;
  onProgress?: (step: string) => void;
};

/** A live fork-to-many: the capture of the running source, and its children. */
export type LiveForkRows = {
  tag: string;
  source_pause_ms: number;
  capture_ready_ms: number;
  total_ms: number;
  captured_pages: number;
  children: ForkRow[];
};

export type PoolRow = { tag: string; size: number; ready: number; starting: number };

/** What a BRANCH reports, the same through the daemon and directly. */
export type BranchRow = {
  tag: string;
  mode?: string;
  status: string;
  pause_ms?: number;
  total_ms?: number | null;
  branched_from?: string;
};

export interface Backend {
  branch(id: string, args: { tag?: string; mode?: string; wait: boolean }): Promise<BranchRow>;
  readonly kind: "daemon" | "direct";
  createSnapshot(args: SnapshotArgs): Promise<ApiSnapshot>;
  listSnapshots(): Promise<ApiSnapshot[]>;
  removeSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean }): Promise<void>;
  snapshotInfo(tag: string): Promise<SnapshotDetails>;
  compactSnapshot(tag: string, to: string): Promise<ApiSnapshot>;
  fork(args: {
    tag: string;
    n: number;
    memoryLimitMib?: number;
    cpuLimit?: number;
    network: boolean;
    allowOut?: string[];
    denyOut?: string[];
    concurrency: number;
    onChild?: () => void;
  }): Promise<ForkRow[]>;
  /** Users' sandboxes; with `pool`, the children waiting in hot pools too. */
  listSandboxes(opts?: { pool?: boolean }): Promise<ApiSandbox[]>;
  listPools(): Promise<PoolRow[]>;
  /** N children of the running sandbox `id` (live fork-to-many). */
  forkLive(id: string, args: { n: number; tag?: string; concurrency: number }): Promise<LiveForkRows>;
  exec(id: string, args: ExecArgs, onStdout: (d: Buffer) => void, onStderr: (d: Buffer) => void): Promise<ExecOutcome>;
  eval(
    id: string,
    code: string,
    language?: "javascript" | "python",
  ): Promise<{ value: unknown; type: string; duration_ms: number; stdout?: string }>;
  files(id: string, args: FilesArgs): Promise<Record<string, unknown>>;
  kill(id: string): Promise<void>;
  ping(id: string): Promise<Record<string, unknown>>;
  workspaces: {
    list(): Promise<ApiWorkspace[]>;
    create(name: string, snapshotTag: string, memoryLimitMib?: number): Promise<ApiWorkspace>;
    suspend(name: string, diff: boolean): Promise<ApiWorkspace>;
    resume(name: string): Promise<ApiWorkspace>;
    remove(name: string): Promise<void>;
  };
}

class DirectBackend implements Backend {
  readonly kind = "direct" as const;

  async branch(id: string, a: { tag?: string; mode?: string; wait: boolean }) {
    if (!a.wait) {
      throw new ForkdError(
        "bad_request",
        "--no-wait needs the daemon (it finishes the snapshot after this command exits); start `forkd daemon` or drop --no-wait",
      );
    }
    const started = await startBranch(id, { tag: a.tag, mode: a.mode });
    const done = await started.done;
    if (done.status === "failed") throw new ForkdError("vm_start_failed", `BRANCH failed: ${done.error}`);
    return done;
  }

  async createSnapshot(a: SnapshotArgs) {
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
    return (await listSnapshots()).map(apiSnapshotView);
  }
  snapshotInfo(tag: string) {
    return snapshotDetails(tag);
  }
  async compactSnapshot(tag: string, to: string) {
    return apiSnapshotView(await compactSnapshot(tag, to));
  }
  async removeSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean }) {
    await removeSnapshot(tag, opts);
  }
  async fork(a: Parameters<Backend["fork"]>[0]) {
    const results = await forkSandboxes({
      tag: a.tag,
      n: a.n,
      memoryLimitMib: a.memoryLimitMib,
      cpuLimit: a.cpuLimit,
      network: a.network,
      ...(a.allowOut?.length ? { allowOut: a.allowOut } : {}),
      ...(a.denyOut?.length ? { denyOut: a.denyOut } : {}),
      concurrency: a.concurrency,
      onChild: a.onChild,
    });
    return results.map(forkRow);
  }
  async listSandboxes(opts: { pool?: boolean } = {}) {
    const bySource = branchesBySource();
    return listSandboxes()
      .filter((sb) => opts.pool || !sb.pool)
      .map((sb) => apiSandboxView(sb, bySource));
  }
  async listPools() {
    return listPools();
  }
  async forkLive(id: string, a: { n: number; tag?: string; concurrency: number }) {
    const started = performance.now();
    const result = await forkLive(id, { n: a.n, ...(a.tag ? { tag: a.tag } : {}), concurrency: a.concurrency });
    if (result.children.some((c) => !c.ok)) {
      for (const c of result.children) if (c.ok) await killSandbox(c.id).catch(() => {});
      await result.discard();
    } else {
      // Without a daemon this process is the writer: the snapshot is registered before it exits.
      await result.register();
    }
    return {
      tag: result.tag,
      source_pause_ms: result.pauseMs,
      capture_ready_ms: result.captureReadyAt - started,
      total_ms: performance.now() - started,
      captured_pages: result.capturedPages,
      children: result.children.map(forkRow),
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
    list: async () => listWorkspaces().map(apiWorkspaceView),
    create: async (name: string, snapshotTag: string, memoryLimitMib?: number) =>
      apiWorkspaceView(await createWorkspace({ name, snapshotTag, ...(memoryLimitMib !== undefined ? { memoryLimitMib } : {}) })),
    suspend: async (name: string, diff: boolean) => apiWorkspaceView(await suspendWorkspace(name, { diff })),
    resume: async (name: string) => apiWorkspaceView(await resumeWorkspace(name)),
    remove: (name: string) => deleteWorkspace(name),
  };
}

function forkRow(r: ForkChildResult): ForkRow {
  return r.ok
    ? {
        id: r.id,
        ok: true,
        vmm_start_ms: r.timings.vmmStartMs,
        restore_ms: r.timings.restoreMs,
        first_answer_ms: r.timings.firstAnswerMs,
        total_ms: r.timings.totalMs,
      }
    : { id: r.id, ok: false, error: r.error };
}

/** API errors come back as ForkdError with the same code, so the CLI reports both paths alike. */
async function viaApi<T>(work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (err) {
    if (err instanceof ForkdApiError) {
      throw new ForkdError(err.code in ERROR_STATUS ? (err.code as ForkdError["code"]) : "internal", err.message, err.details ?? {});
    }
    throw err;
  }
}
class DaemonBackend implements Backend {
  readonly kind = "daemon" as const;
  constructor(private readonly controller: Controller) {}

  branch(id: string, a: { tag?: string; mode?: string; wait: boolean }) {
    return viaApi(
      async (): Promise<BranchRow> =>
        this.controller.branchSandbox(id, {
          ...(a.tag ? { tag: a.tag } : {}),
          ...(a.mode ? { mode: a.mode as "full" | "diff" | "live" } : {}),
          wait: a.wait,
        }),
    );
  }

  createSnapshot(a: SnapshotArgs) {
    return viaApi(() =>
      this.controller.createSnapshot({
        tag: a.tag,
        image: a.image,
        warm: a.warm,
        warm_eval: a.warmEval,
        memory_mib: a.memoryMib,
        vcpus: a.vcpus,
      }),
    );
  }
  listSnapshots() {
    return viaApi(async () => (await this.controller.listSnapshots()).filter((snap) => snap.status === "ready") as ApiSnapshot[]);
  }
  removeSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean }) {
    return viaApi(() => this.controller.deleteSnapshot(tag, opts));
  }
  snapshotInfo(tag: string) {
    return viaApi(() => this.controller.snapshotInfo(tag));
  }
  compactSnapshot(tag: string, to: string) {
    return viaApi(() => this.controller.compactSnapshot(tag, to));
  }
  fork(a: Parameters<Backend["fork"]>[0]) {
    return viaApi(async () => {
      const res = await this.controller.createSandboxes({
        snapshot_tag: a.tag,
        n: a.n,
        network: a.network,
        ...(a.memoryLimitMib ? { memory_limit_mib: a.memoryLimitMib } : {}),
        ...(a.cpuLimit !== undefined ? { cpu_limit: a.cpuLimit } : {}),
        ...(a.allowOut?.length ? { allow_out: a.allowOut } : {}),
        ...(a.denyOut?.length ? { deny_out: a.denyOut } : {}),
      });
      return res.map(
        (c): ForkRow => ({
          id: c.id,
          ok: true,
          ...(c.timings
            ? {
                vmm_start_ms: c.timings.vmm_start_ms,
                restore_ms: c.timings.restore_ms,
                first_answer_ms: c.timings.first_answer_ms,
                total_ms: c.timings.total_ms,
              }
            : {}),
        }),
      );
    });
  }
  listSandboxes(opts: { pool?: boolean } = {}) {
    return viaApi(() => this.controller.listSandboxes(opts));
  }
  listPools() {
    return viaApi(() => this.controller.listPools());
  }
  forkLive(id: string, a: { n: number; tag?: string; concurrency: number }) {
    return viaApi(async (): Promise<LiveForkRows> => {
      const res = await this.controller.forkLive(id, { n: a.n, ...(a.tag ? { tag: a.tag } : {}) });
      return {
        tag: res.tag,
        source_pause_ms: res.source_pause_ms,
        capture_ready_ms: res.capture_ready_ms,
        total_ms: res.total_ms,
        captured_pages: res.captured_pages,
        children: res.sandboxes.map(
          (c): ForkRow => ({
            id: c.id,
            ok: true,
            ...(c.timings
              ? {
                  vmm_start_ms: c.timings.vmm_start_ms,
                  restore_ms: c.timings.restore_ms,
                  first_answer_ms: c.timings.first_answer_ms,
                  total_ms: c.timings.total_ms,
                }
              : {}),
          }),
        ),
      };
    });
  }
  exec(id: string, a: ExecArgs, onStdout: (d: Buffer) => void, onStderr: (d: Buffer) => void) {
    return viaApi(async () => {
      const exit = await this.controller.execStream(
        id,
        {
          ...(a.argv ? { argv: a.argv } : { cmd: a.cmd }),
          ...(a.env ? { env: a.env } : {}),
          ...(a.cwd ? { cwd: a.cwd } : {}),
          ...(a.timeoutMs ? { timeout_ms: a.timeoutMs } : {}),
          ...(a.stdin ? { stdin: a.stdin.toString("base64"), stdin_encoding: "base64" as const } : {}),
        },
        { onStdout, onStderr },
      );
      return { exitCode: exit.exit_code, signal: exit.signal, timedOut: exit.timed_out };
    });
  }
  eval(id: string, code: string, language?: "javascript" | "python") {
    return viaApi(async () => {
      const res = await this.controller.eval(id, { code, ...(language ? { language } : {}) });
      if (res.exit_code !== 0) throw new ForkdError("bad_request", res.error ?? "the code raised an error", { agentCode: "eval_error" });
      return {
        value: res.value,
        type: res.type ?? typeof res.value,
        duration_ms: res.duration_ms,
        ...(res.stdout ? { stdout: res.stdout } : {}),
      };
    });
  }
  files(id: string, a: FilesArgs) {
    return viaApi(() =>
      a.action === "write"
        ? this.controller.files(id, {
            action: "write",
            path: a.path,
            data: (a.data ?? Buffer.alloc(0)).toString("base64"),
            encoding: "base64",
          })
        : this.controller.files(id, { action: a.action, path: a.path }),
    );
  }
  kill(id: string) {
    return viaApi(() => this.controller.deleteSandbox(id));
  }
  ping(id: string) {
    return viaApi(async (): Promise<Record<string, unknown>> => this.controller.ping(id));
  }
  readonly workspaces = {
    list: () => viaApi(() => this.controller.listWorkspaces()),
    create: (name: string, snapshotTag: string, memoryLimitMib?: number) =>
      viaApi(() =>
        this.controller.createWorkspace({
          name,
          snapshot_tag: snapshotTag,
          ...(memoryLimitMib !== undefined ? { memory_limit_mib: memoryLimitMib } : {}),
        }),
      ),
    suspend: (name: string, diff: boolean) => viaApi(() => this.controller.suspendWorkspace(name, { diff })),
    resume: (name: string) => viaApi(() => this.controller.resumeWorkspace(name)),
    remove: (name: string) => viaApi(() => this.controller.deleteWorkspace(name)),
  };
}

/**
 * FORKD_URL (with FORKD_TOKEN) names a daemon explicitly, and then it must answer.
 * Otherwise a daemon on the default socket is used when it answers /healthz;
 * with none, the CLI works on core directly.
 */
export async function openBackend(): Promise<Backend> {
  if (process.env.FORKD_URL) return new DaemonBackend(Controller.fromEnv());
  const socket = process.env.FORKD_SOCKET ?? path.join(forkdRunDir(), "forkd.sock");
  if (fs.existsSync(socket)) {
    const controller = Controller.fromEnv();
    try {
      await controller.health();
      return new DaemonBackend(controller);
    } catch {
      await controller.close();
    }
  }
  return new DirectBackend();
}
