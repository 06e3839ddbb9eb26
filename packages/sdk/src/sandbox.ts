// An E2B-shaped Sandbox over the forkd API, plus forkd's own Sandbox.fork.
import { Controller, ForkdApiError } from "./controller.js";

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

export const DEFAULT_TIMEOUT_MS = 300_000;

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

export class CommandHandle {
  constructor(
    private readonly done: Promise<CommandResult>,
    private readonly abort: AbortController,
  ) {}
  wait(): Promise<CommandResult> {
    return this.done;
  }
  /** Stop the command (its whole process group in the guest). */
  async kill(): Promise<boolean> {
    this.abort.abort();
    return true;
  }
}

export type EntryInfo = { name: string; type: "file" | "dir" | "symlink" | "other"; path: string; size: number };

export class Sandbox {
  readonly commands: {
    run(cmd: string, opts: CommandRunOpts & { background: true }): Promise<CommandHandle>;
    run(cmd: string, opts?: CommandRunOpts): Promise<CommandResult>;
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
      if (opts.background) {
        done.catch(() => {});
        return new CommandHandle(done, abort);
      }
      return done;
    };
    this.commands = { run } as Sandbox["commands"];
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

function egressLists(opts: Omit<SandboxOpts, "template">): { allow_out?: string[]; deny_out?: string[] } {
  const allow = [...(opts.allowOut ?? []), ...(opts.network?.allowOut ?? [])];
  const deny = [...(opts.denyOut ?? []), ...(opts.network?.denyOut ?? [])];
  return { ...(allow.length ? { allow_out: allow } : {}), ...(deny.length ? { deny_out: deny } : {}) };
}
