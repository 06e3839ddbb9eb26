// An E2B-shaped Sandbox over the forkd API, plus forkd's own Sandbox.fork.
import { constants } from "node:os";
import type * as S from "@forkd/daemon/schemas";
import { ForkdApiError } from "./api-error.js";
import { Controller, type ExecExit } from "./controller.js";

export type SandboxOpts = {
  /** Snapshot tag to start from (E2B calls it a template). */
  template?: string;
  /** Environment variables applied to every command run through this object. */
  envs?: Record<string, string>;
  /** The sandbox is killed this long after it starts; E2B's default is 5 minutes, and so is ours. */
  timeoutMs?: number;
  metadata?: Record<string, string>;
  /** CPUs the sandbox may use (a cgroup quota; fractions allowed, e.g. 0.5); its vCPUs by default. */
  cpuLimit?: number;
  /** E2B's switch: false gives the sandbox no network at all. */
  allowInternetAccess?: boolean;
  /** Destinations the default egress policy denies that this sandbox may reach: IP, CIDR, IP:PORT, [v6]:PORT, CIDR:PORT. */
  allowOut?: string[];
  /** Destinations the default allows that this sandbox may not reach; allowOut wins where both match. */
  denyOut?: string[];
  /** E2B's shape of the same lists (`denyOut: [ALL_TRAFFIC], allowOut: [...]` is an allow-list); joined with the two above. */
  network?: { allowOut?: string[]; denyOut?: string[] };
  controller?: Controller;
};

/** E2B's name for every IPv4 destination. */
export const ALL_TRAFFIC = "0.0.0.0/0";

const DEFAULT_TIMEOUT_MS = 300_000;

export type CommandResult = { exitCode: number; stdout: string; stderr: string; error?: string };

export type CommandRunOpts = {
  envs?: Record<string, string>;
  cwd?: string;
  timeoutMs?: number;
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  background?: boolean;
};

/** Thrown by commands.run when the command exits non-zero, as in E2B. */
export class CommandExitError extends Error implements CommandResult {
  override readonly name = "CommandExitError";
  constructor(
    readonly exitCode: number,
    readonly stdout: string,
    readonly stderr: string,
    readonly error?: string,
  ) {
    super(`command exited with ${exitCode}${error ? ` (${error})` : ""}: ${stderr.slice(-500)}`);
  }
}

/** A background process as E2B's commands.list describes it, with forkd's extras. */
export type ProcessInfo = {
  pid: number;
  tag?: string;
  cmd: string;
  args: string[];
  envs: Record<string, string>;
  cwd?: string;
  running: boolean;
  exitCode: number | null;
  signal: string | null;
  startedAt: Date;
  endedAt: Date | null;
};

export type CommandConnectOpts = { onStdout?: (data: string) => void; onStderr?: (data: string) => void };

/** E2B's exit code for a process a signal ended: 128 plus the signal's number. */
function exitCodeOf(exit: ExecExit): number {
  if (exit.exit_code !== null) return exit.exit_code;
  const n = exit.signal ? constants.signals[exit.signal as keyof typeof constants.signals] : undefined;
  return 128 + (n ?? constants.signals.SIGKILL);
}

/**
 * A background process (E2B's CommandHandle): it runs in the sandbox whether or not
 * anything follows it; this handle follows its output from the start of what the
 * sandbox kept. `disconnect` stops following, `kill` stops the process.
 */
export class CommandHandle {
  private out = "";
  private err = "";
  private readonly follow = new AbortController();
  private readonly done: Promise<CommandResult>;
  exitCode: number | undefined;
  error: string | undefined;

  constructor(
    readonly pid: number,
    private readonly controller: Controller,
    private readonly sandboxId: string,
    opts: CommandConnectOpts = {},
  ) {
    this.done = controller
      .processOutput(sandboxId, pid, {
        signal: this.follow.signal,
        onStdout: (d) => {
          const text = d.toString("utf8");
          this.out += text;
          opts.onStdout?.(text);
        },
        onStderr: (d) => {
          const text = d.toString("utf8");
          this.err += text;
          opts.onStderr?.(text);
        },
      })
      .then((exit) => {
        const exitCode = exitCodeOf(exit);
        this.exitCode = exitCode;
        const error = exit.timed_out ? "timed out" : exit.signal ? `killed by ${exit.signal}` : undefined;
        if (error) this.error = error;
        if (exitCode !== 0) throw new CommandExitError(exitCode, this.out, this.err, error);
        return { exitCode, stdout: this.out, stderr: this.err };
      });
    this.done.catch(() => {});
  }

  get stdout(): string {
    return this.out;
  }
  get stderr(): string {
    return this.err;
  }

  /** Its result once it exits; a non-zero exit throws CommandExitError, as in E2B. */
  wait(): Promise<CommandResult> {
    return this.done;
  }

  /** Kill the process (its whole process group in the guest); false if it had already exited or is unknown. */
  async kill(): Promise<boolean> {
    return killProcess(this.controller, this.sandboxId, this.pid);
  }

  /** Stop following its output; it runs on (commands.connect follows it again). */
  async disconnect(): Promise<void> {
    this.follow.abort();
  }
}

async function killProcess(controller: Controller, sandboxId: string, pid: number, signal?: S.ProcessSignalT): Promise<boolean> {
  try {
    await controller.killProcess(sandboxId, pid, signal ? { signal } : {});
    return true;
  } catch (err) {
    if (err instanceof ForkdApiError && (err.code === "not_found" || err.code === "invalid_state")) return false;
    throw err;
  }
}

export type EntryInfo = { name: string; type: "file" | "dir" | "symlink" | "other"; path: string; size: number };

export class Sandbox {
  readonly commands: {
    run(cmd: string, opts: CommandRunOpts & { background: true }): Promise<CommandHandle>;
    run(cmd: string, opts?: CommandRunOpts): Promise<CommandResult>;
    /** Background processes, running and recently exited. */
    list(): Promise<ProcessInfo[]>;
    /** Kill a background process (SIGKILL unless told); false if it had exited or is unknown. */
    kill(pid: number, opts?: { signal?: S.ProcessSignalT }): Promise<boolean>;
    /** Follow a running (or recently exited) background process again, from the output it kept. */
    connect(pid: number, opts?: CommandConnectOpts): Promise<CommandHandle>;
    sendStdin(pid: number, data: string | Uint8Array): Promise<void>;
    closeStdin(pid: number): Promise<void>;
  };
  readonly files: {
    read(path: string, opts?: { format?: "text" | "bytes" }): Promise<string | Uint8Array>;
    write(path: string, data: string | Uint8Array): Promise<{ path: string }>;
    list(path: string): Promise<EntryInfo[]>;
    remove(path: string): Promise<void>;
    makeDir(path: string): Promise<boolean>;
    exists(path: string): Promise<boolean>;
  };

  private constructor(
    readonly sandboxId: string,
    private readonly controller: Controller,
    private readonly envs: Record<string, string> = {},
  ) {
    const run = async (cmd: string, opts: CommandRunOpts = {}): Promise<CommandResult | CommandHandle> => {
      if (opts.background) {
        const started = await this.controller.execBackground(this.sandboxId, {
          cmd,
          env: { ...this.envs, ...(opts.envs ?? {}) },
          ...(opts.cwd ? { cwd: opts.cwd } : {}),
          ...(opts.timeoutMs ? { timeout_ms: opts.timeoutMs } : {}),
        });
        return new CommandHandle(started.pid, this.controller, this.sandboxId, opts);
      }
      const abort = new AbortController();
      let stdout = "";
      let stderr = "";
      const done = this.controller
        .execStream(
          this.sandboxId,
          {
            cmd,
            env: { ...this.envs, ...(opts.envs ?? {}) },
            ...(opts.cwd ? { cwd: opts.cwd } : {}),
            ...(opts.timeoutMs ? { timeout_ms: opts.timeoutMs } : {}),
          },
          {
            signal: abort.signal,
            onStdout: (d) => {
              const text = d.toString("utf8");
              stdout += text;
              opts.onStdout?.(text);
            },
            onStderr: (d) => {
              const text = d.toString("utf8");
              stderr += text;
              opts.onStderr?.(text);
            },
          },
        )
        .then((exit) => {
          const exitCode = exit.exit_code ?? 128 + 9;
          const error = exit.timed_out ? `timed out after ${opts.timeoutMs} ms` : exit.signal ? `killed by ${exit.signal}` : undefined;
          if (exitCode !== 0) throw new CommandExitError(exitCode, stdout, stderr, error);
          return { exitCode, stdout, stderr };
        });
      return done;
    };
    this.commands = {
      run: run as Sandbox["commands"]["run"],
      list: async () => (await this.controller.listProcesses(this.sandboxId)).map(processInfo),
      kill: (pid, opts = {}) => killProcess(this.controller, this.sandboxId, pid, opts.signal),
      connect: async (pid, opts = {}) => {
        // An unknown pid fails here, as in E2B, not later in wait().
        await this.controller.getProcess(this.sandboxId, pid);
        return new CommandHandle(pid, this.controller, this.sandboxId, opts);
      },
      sendStdin: async (pid, data) => {
        const body =
          typeof data === "string"
            ? { data, encoding: "utf8" as const }
            : { data: Buffer.from(data).toString("base64"), encoding: "base64" as const };
        await this.controller.sendProcessStdin(this.sandboxId, pid, body);
      },
      closeStdin: async (pid) => {
        await this.controller.sendProcessStdin(this.sandboxId, pid, { eof: true });
      },
    };
    this.files = {
      read: async (path, opts = {}) => {
        const res = await this.controller.files<{ data: string }>(this.sandboxId, { action: "read", path });
        const bytes = Buffer.from(res.data, "base64");
        return opts.format === "bytes" ? new Uint8Array(bytes) : bytes.toString("utf8");
      },
      write: async (path, data) => {
        const encoded =
          typeof data === "string"
            ? { data, encoding: "utf8" as const }
            : { data: Buffer.from(data).toString("base64"), encoding: "base64" as const };
        await this.controller.files(this.sandboxId, { action: "write", path, ...encoded });
        return { path };
      },
      list: async (path) => {
        const res = await this.controller.files<{ entries: { name: string; type: EntryInfo["type"]; size: number }[] }>(this.sandboxId, {
          action: "list",
          path,
        });
        return res.entries.map((e) => ({ ...e, path: `${path.replace(/\/+$/, "")}/${e.name}` }));
      },
      remove: async (path) => {
        await this.controller.files(this.sandboxId, { action: "remove", path, recursive: true });
      },
      makeDir: async (path) => {
        const existed = await this.files.exists(path);
        await this.controller.files(this.sandboxId, { action: "mkdir", path });
        return !existed;
      },
      exists: async (path) => {
        try {
          await this.controller.files(this.sandboxId, { action: "stat", path });
          return true;
        } catch (err) {
          if (err instanceof ForkdApiError && err.code === "not_found") return false;
          throw err;
        }
      },
    };
  }

  /** Start one sandbox from a snapshot (`template`). */
  static async create(opts: SandboxOpts = {}): Promise<Sandbox> {
    const [sandbox] = await Sandbox.fork(opts.template ?? "default", 1, opts);
    return sandbox!;
  }

  /** forkd's addition: N children of one warm snapshot in one call. */
  static async fork(template: string, n: number, opts: Omit<SandboxOpts, "template"> = {}): Promise<Sandbox[]> {
    const controller = opts.controller ?? Controller.fromEnv();
    const res = await controller.createSandboxes({
      snapshot_tag: template,
      n,
      timeout_ms: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      ...(opts.metadata ? { metadata: opts.metadata } : {}),
      ...(opts.cpuLimit !== undefined ? { cpu_limit: opts.cpuLimit } : {}),
      ...(opts.allowInternetAccess === false ? { network: false } : {}),
      ...egressLists(opts),
    });
    return res.map((s) => new Sandbox(s.id, controller, opts.envs));
  }

  static async connect(sandboxId: string, opts: Omit<SandboxOpts, "template"> = {}): Promise<Sandbox> {
    const controller = opts.controller ?? Controller.fromEnv();
    await controller.getSandbox(sandboxId);
    return new Sandbox(sandboxId, controller, opts.envs);
  }

  /** Evaluate JavaScript in the sandbox's warm context; state persists between calls. */
  async runCode(
    code: string,
    opts: { timeoutMs?: number; language?: "javascript" | "python" } = {},
  ): Promise<{ value: unknown; type: string; durationMs: number; stdout?: string }> {
    const res = await this.controller.eval(this.sandboxId, {
      code,
      ...(opts.timeoutMs ? { timeout_ms: opts.timeoutMs } : {}),
      ...(opts.language ? { language: opts.language } : {}),
    });
    if (res.timed_out) throw new ForkdApiError(504, "vm_timeout", res.error ?? "the code ran past its timeout");
    if (res.exit_code !== 0) throw new ForkdApiError(400, "eval_error", res.error ?? "the code raised an error");
    return {
      value: res.value,
      type: res.type ?? typeof res.value,
      durationMs: res.duration_ms,
      ...(res.stdout ? { stdout: res.stdout } : {}),
    };
  }

  /** forkd's addition: capture this running sandbox as a new snapshot that more sandboxes fork from. */
  async branch(opts: { tag?: string; mode?: "full" | "diff" | "live"; wait?: boolean } = {}) {
    return this.controller.branchSandbox(this.sandboxId, opts);
  }

  /**
   * forkd's addition: N children of this running sandbox in one call (live
   * fork-to-many). This sandbox is paused only while what it wrote is copied and
   * keeps running; the children start from its state at that moment.
   */
  async fork(n = 1, opts: { tag?: string; timeoutMs?: number; metadata?: Record<string, string>; envs?: Record<string, string> } = {}) {
    const res = await this.controller.forkLive(this.sandboxId, {
      n,
      ...(opts.tag ? { tag: opts.tag } : {}),
      timeout_ms: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      ...(opts.metadata ? { metadata: opts.metadata } : {}),
    });
    return res.sandboxes.map((s) => new Sandbox(s.id, this.controller, opts.envs ?? this.envs));
  }

  async isRunning(): Promise<boolean> {
    try {
      await this.controller.ping(this.sandboxId);
      return true;
    } catch {
      return false;
    }
  }

  async kill(): Promise<void> {
    await this.controller.deleteSandbox(this.sandboxId);
  }
}

function processInfo(p: S.ProcessInfoT): ProcessInfo {
  return {
    pid: p.pid,
    ...(p.tag !== null ? { tag: p.tag } : {}),
    cmd: p.cmd,
    args: p.args,
    envs: p.envs,
    cwd: p.cwd,
    running: p.running,
    exitCode: p.exit_code,
    signal: p.signal,
    startedAt: new Date(p.started_at),
    endedAt: p.ended_at === null ? null : new Date(p.ended_at),
  };
}

function egressLists(opts: Omit<SandboxOpts, "template">): { allow_out?: string[]; deny_out?: string[] } {
  const allow = [...(opts.allowOut ?? []), ...(opts.network?.allowOut ?? [])];
  const deny = [...(opts.denyOut ?? []), ...(opts.network?.denyOut ?? [])];
  return { ...(allow.length ? { allow_out: allow } : {}), ...(deny.length ? { deny_out: deny } : {}) };
}
