// The CLI's backend through a daemon: every call one REST request through @forkd/sdk.
// Loaded only when a daemon is there (the SDK's HTTP client, undici, is a large part
// of a short command's start-up, and the direct path never needs it).
import type { ApiSnapshot } from "@forkd/core";
import { ForkdError, isErrorCode } from "@forkd/core/errors";
import { settingsEnv } from "@forkd/core/settings";
import { Controller, ForkdApiError } from "@forkd/sdk";
import type { Backend, BranchRow, ExecArgs, FilesArgs, LiveForkRows, SnapshotArgs } from "./backend-types.js";
import { forkRowOf } from "./fork-row.js";

/** API errors come back as ForkdError with the same code, so the CLI reports both paths alike. */
export async function viaApi<T>(work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (err) {
    if (err instanceof ForkdApiError) {
      throw new ForkdError(isErrorCode(err.code) ? err.code : "internal", err.message, err.details ?? {});
    }
    throw err;
  }
}
export class DaemonBackend implements Backend {
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
      return res.map(forkRowOf);
    });
  }
  listSandboxes(opts: { pool?: boolean } = {}) {
    return viaApi(() => this.controller.listSandboxes(opts));
  }
  listPools() {
    return viaApi(() => this.controller.listPools());
  }
  forkLive(id: string, a: { n: number; tag?: string; concurrency?: number }) {
    return viaApi(async (): Promise<LiveForkRows> => {
      const res = await this.controller.forkLive(id, { n: a.n, ...(a.tag ? { tag: a.tag } : {}) });
      return {
        tag: res.tag,
        source_pause_ms: res.source_pause_ms,
        capture_ready_ms: res.capture_ready_ms,
        total_ms: res.total_ms,
        captured_pages: res.captured_pages,
        children: res.sandboxes.map(forkRowOf),
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
 * The daemon the settings name: FORKD_URL (or --daemon-url) with its token, else the
 * local socket. The SDK finds it from the variables it is given: this process's,
 * with what the CLI's flags decided written in.
 */
export function configuredController(): Controller {
  return Controller.fromEnv(settingsEnv());
}
