// Background processes: started by one call, they outlive it and the host connection
// that made it, and they are carried into every child of a snapshot (they are guest
// processes, and this registry is guest memory, restored with them). Their output
// always drains into bounded rings, so a process never blocks on a host that is not
// reading; any number of later attaches replay what the rings hold, then follow.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { statSync } from "node:fs";
import path from "node:path";
import {
  EXITED_PROCESS_KEEP_MS,
  MAX_BACKGROUND_PROCESSES,
  MAX_EXITED_PROCESSES,
  MAX_PROCESS_STDIN_BYTES,
  PROCESS_OUTPUT_RING_BYTES,
  PROCESS_SIGNALS,
  type ProcAttachRequest,
  type ProcExit,
  type ProcessSignal,
  type ProcInfo,
  type ProcKillRequest,
  type ProcKillResult,
  type ProcStartRequest,
  type ProcStdinRequest,
  type ProcStdinResult,
} from "../protocol.js";
import { AgentOpError } from "./errors.js";
import {
  type ChunkSink,
  DEFAULT_ENV,
  drainLeftovers,
  type OutputFlow,
  validateEnv,
  validateExec,
  validateTimeout,
  whenExitSettled,
} from "./exec.js";
import { type GuestUser, lookupUser } from "./users.js";

export type ProcessLimits = {
  maxRunning: number;
  maxExited: number;
  keepExitedMs: number;
  ringBytes: number;
  /** Chunks kept per stream whatever their size: a writer of single bytes costs an object each. */
  ringChunks: number;
};

const DEFAULT_PROCESS_LIMITS: ProcessLimits = {
  maxRunning: MAX_BACKGROUND_PROCESSES,
  maxExited: MAX_EXITED_PROCESSES,
  keepExitedMs: EXITED_PROCESS_KEEP_MS,
  ringBytes: PROCESS_OUTPUT_RING_BYTES,
  ringChunks: 4096,
};

const TAG_RE = /^[\x20-\x7e]{1,128}$/;
const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

type Stream = "stdout" | "stderr";
/** `seq` orders chunks across both streams; `offset` is where the chunk starts in its stream's whole output. */
type Chunk = { seq: number; offset: number; data: Buffer };

/** The most recent output of one stream: at most `maxBytes` (whole chunks) and `maxChunks` chunks. */
class OutputRing {
  private chunks: Chunk[] = [];
  private head = 0;
  private bytes = 0;
  /** Bytes the stream has produced in all. */
  total = 0;

  constructor(
    private readonly maxBytes: number,
    private readonly maxChunks: number,
  ) {}

  push(seq: number, data: Buffer): void {
    this.chunks.push({ seq, offset: this.total, data });
    this.total += data.length;
    this.bytes += data.length;
    while (this.chunks.length - this.head > 1 && (this.bytes > this.maxBytes || this.chunks.length - this.head > this.maxChunks)) {
      this.bytes -= this.chunks[this.head]!.data.length;
      this.head++;
    }
    // Evicted chunks are sliced off now and then, not on every push.
    if (this.head >= 1024 && this.head * 2 >= this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  /** The oldest chunk still held with a seq of at least `seq`. */
  from(seq: number): Chunk | undefined {
    let lo = this.head;
    let hi = this.chunks.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.chunks[mid]!.seq < seq) lo = mid + 1;
      else hi = mid;
    }
    return this.chunks[lo];
  }
}

type Exit = { exitCode: number | null; signal: string | null; timedOut: boolean; durationMs: number; endedAtMs: number };

type Proc = {
  pid: number;
  child: ChildProcessWithoutNullStreams;
  request: { argv?: string[]; cmd?: string; cwd: string; env: Record<string, string>; tag?: string; user?: string };
  startedAtMs: number;
  started: number;
  rings: Record<Stream, OutputRing>;
  exit?: Exit;
  timedOut: boolean;
  stdinOpen: boolean;
  /** Attaches waiting for output or the exit. */
  waiters: Set<() => void>;
  timer?: NodeJS.Timeout;
  dropTimer?: NodeJS.Timeout;
};

export class ProcessRegistry {
  private readonly procs = new Map<number, Proc>();
  private seq = 0;
  private readonly limits: ProcessLimits;

  constructor(limits: Partial<ProcessLimits> = {}) {
    this.limits = { ...DEFAULT_PROCESS_LIMITS, ...limits };
  }

  get running(): number {
    let n = 0;
    for (const p of this.procs.values()) if (!p.exit) n++;
    return n;
  }

  async start(request: ProcStartRequest): Promise<ProcInfo> {
    const { file, args } = validateExec({ ...request, op: "exec" });
    const timeoutMs = validateTimeout(request.timeoutMs);
    const userEnv = validateEnv(request.env);
    if (request.cwd !== undefined && (typeof request.cwd !== "string" || request.cwd === "")) {
      throw new AgentOpError("bad_request", "`cwd` must be a non-empty string");
    }
    if (request.tag !== undefined && (typeof request.tag !== "string" || !TAG_RE.test(request.tag))) {
      throw new AgentOpError("bad_request", "`tag` must be 1-128 printable ASCII characters");
    }
    const stdin = request.stdin === undefined ? undefined : decodeBase64(request.stdin, "stdin");
    if (request.stdinOpen !== undefined && typeof request.stdinOpen !== "boolean") {
      throw new AgentOpError("bad_request", "`stdinOpen` must be a boolean");
    }
    const user = request.user === undefined ? undefined : lookupUser(request.user);
    const running = this.running;
    if (running >= this.limits.maxRunning) {
      throw new AgentOpError(
        "agent_busy",
        `${running} background processes already run in this sandbox, its limit; kill one or wait for one to exit before starting another`,
        { limit: this.limits.maxRunning },
      );
    }
    const cwd = user ? path.resolve(user.home, request.cwd ?? ".") : (request.cwd ?? "/root");
    const env = user ? { ...loginEnv(user), ...userEnv } : { ...DEFAULT_ENV, ...userEnv };
    const child = spawn(file, args, {
      cwd,
      env,
      detached: true,
      stdio: ["pipe", "pipe", "pipe"],
      // libuv drops the supplementary groups when it changes the uid: the process has the user's primary group only.
      ...(user ? { uid: user.uid, gid: user.gid } : {}),
    });
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", () => {
        child.off("error", reject);
        resolve();
      });
      child.once("error", (err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT" && !isDirectory(cwd)) reject(new AgentOpError("not_found", `working directory does not exist: ${cwd}`));
        else if (err.code === "ENOENT") reject(new AgentOpError("not_found", `no such program: ${file}`));
        else if (err.code === "EACCES") reject(new AgentOpError("permission_denied", `cannot execute ${file}: permission denied`));
        else reject(new AgentOpError("io_error", `could not start ${file}: ${err.message}`));
      });
    });
    const pid = child.pid!;
    // A pid can come back once its holder is gone: an exited record under it is stale.
    this.drop(pid);
    const proc: Proc = {
      pid,
      child,
      request: {
        ...(request.argv ? { argv: [...request.argv] } : { cmd: request.cmd as string }),
        cwd,
        env: { ...userEnv },
        ...(request.tag !== undefined ? { tag: request.tag } : {}),
        ...(user ? { user: user.name } : {}),
      },
      startedAtMs: Date.now(),
      started: performance.now(),
      rings: {
        stdout: new OutputRing(this.limits.ringBytes, this.limits.ringChunks),
        stderr: new OutputRing(this.limits.ringBytes, this.limits.ringChunks),
      },
      timedOut: false,
      stdinOpen: true,
      waiters: new Set(),
    };
    this.procs.set(pid, proc);
    let lastOutputAt = 0;
    const onData = (stream: Stream) => (data: Buffer) => {
      lastOutputAt = performance.now();
      proc.rings[stream].push(this.seq++, data);
      this.wake(proc);
    };
    child.stdout.on("data", onData("stdout"));
    child.stderr.on("data", onData("stderr"));
    child.on("error", () => {
      // A failed kill or pipe after the start; the exit is what matters.
    });
    child.stdin.on("error", () => {
      proc.stdinOpen = false;
    });
    if (timeoutMs !== undefined) {
      proc.timer = setTimeout(() => {
        proc.timedOut = true;
        killGroup(child, "SIGKILL");
      }, timeoutMs);
    }
    whenExitSettled(
      child,
      () => lastOutputAt,
      (code, sig) => this.exited(proc, code, sig),
    );
    if (stdin && stdin.length > 0) child.stdin.write(stdin);
    if (request.stdinOpen === false) {
      child.stdin.end();
      proc.stdinOpen = false;
    }
    return info(proc);
  }

  private exited(proc: Proc, exitCode: number | null, signal: string | null): void {
    if (proc.timer) clearTimeout(proc.timer);
    proc.exit = {
      exitCode,
      signal,
      timedOut: proc.timedOut,
      durationMs: performance.now() - proc.started,
      endedAtMs: Date.now(),
    };
    proc.stdinOpen = false;
    proc.child.stdin.destroy();
    this.wake(proc);
    proc.dropTimer = setTimeout(() => this.drop(proc.pid, proc), this.limits.keepExitedMs);
    proc.dropTimer.unref?.();
    const exited = [...this.procs.values()].filter((p) => p.exit).sort((a, b) => a.exit!.endedAtMs - b.exit!.endedAtMs);
    for (const old of exited.slice(0, Math.max(0, exited.length - this.limits.maxExited))) this.drop(old.pid, old);
  }

  /** Forget an exited process (a running one is never dropped). */
  private drop(pid: number, only?: Proc): void {
    const proc = this.procs.get(pid);
    if (!proc?.exit || (only && proc !== only)) return;
    if (proc.dropTimer) clearTimeout(proc.dropTimer);
    this.procs.delete(pid);
    drainLeftovers(proc.child);
  }

  private wake(proc: Proc): void {
    for (const wake of [...proc.waiters]) wake();
  }

  private get(pid: unknown): Proc {
    if (typeof pid !== "number" || !Number.isSafeInteger(pid) || pid <= 0) {
      throw new AgentOpError("bad_request", "`pid` must be a positive integer");
    }
    const proc = this.procs.get(pid);
    if (!proc)
      throw new AgentOpError(
        "not_found",
        `no background process ${pid} in this sandbox (exited ones are kept for a while, then forgotten)`,
      );
    return proc;
  }

  list(): ProcInfo[] {
    return [...this.procs.values()].sort((a, b) => a.startedAtMs - b.startedAtMs || a.pid - b.pid).map(info);
  }

  /** Signal the process's whole group (it was started as a group leader), so what it started goes too. */
  kill(request: ProcKillRequest): ProcKillResult {
    const proc = this.get(request.pid);
    const signal = request.signal ?? "SIGKILL";
    if (!(PROCESS_SIGNALS as readonly string[]).includes(signal)) {
      throw new AgentOpError("bad_request", `\`signal\` must be one of ${PROCESS_SIGNALS.join(", ")}`);
    }
    if (proc.exit) throw new AgentOpError("not_running", `process ${proc.pid} has already exited`, exitDetails(proc.exit));
    return { pid: proc.pid, signal, signalled: killGroup(proc.child, signal) };
  }

  stdin(request: ProcStdinRequest): ProcStdinResult {
    const proc = this.get(request.pid);
    const data = request.data === undefined ? Buffer.alloc(0) : decodeBase64(request.data, "data");
    if (request.eof !== undefined && typeof request.eof !== "boolean") throw new AgentOpError("bad_request", "`eof` must be a boolean");
    if (data.length > MAX_PROCESS_STDIN_BYTES) {
      throw new AgentOpError(
        "too_large",
        `stdin data of ${data.length} bytes is over the ${MAX_PROCESS_STDIN_BYTES}-byte limit of one call`,
      );
    }
    if (proc.exit) throw new AgentOpError("not_running", `process ${proc.pid} has already exited`, exitDetails(proc.exit));
    if (!proc.stdinOpen) throw new AgentOpError("not_running", `the stdin of process ${proc.pid} is closed`);
    const pending = proc.child.stdin.writableLength;
    if (pending + data.length > MAX_PROCESS_STDIN_BYTES) {
      throw new AgentOpError(
        "agent_busy",
        `process ${proc.pid} has ${pending} bytes of stdin it has not read yet; retry once it reads more`,
      );
    }
    if (data.length > 0) proc.child.stdin.write(data);
    if (request.eof) {
      proc.child.stdin.end();
      proc.stdinOpen = false;
    }
    return { pid: proc.pid, bytes: data.length, stdinOpen: proc.stdinOpen };
  }

  /**
   * Replay the rings, then follow live output, then answer with the exit. Output that
   * left a ring before it could be sent (the host reading slower than the process
   * writes) is counted, never waited for: the process is never held back by an attach.
   */
  async attach(request: ProcAttachRequest, signal: AbortSignal, onChunk: ChunkSink, flow?: OutputFlow): Promise<ProcExit> {
    const proc = this.get(request.pid);
    const aborted = new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
    if (request.fromNow !== undefined && typeof request.fromNow !== "boolean") {
      throw new AgentOpError("bad_request", "`fromNow` must be a boolean");
    }
    // From now: what the rings hold is skipped, and not counted as dropped.
    const delivered: Record<Stream, number> = request.fromNow
      ? { stdout: proc.rings.stdout.total, stderr: proc.rings.stderr.total }
      : { stdout: 0, stderr: 0 };
    let cursor = request.fromNow ? this.seq : 0;
    let droppedBytes = 0;
    for (;;) {
      if (signal.aborted) throw new AgentOpError("cancelled", `detached from process ${proc.pid}`);
      const out = proc.rings.stdout.from(cursor);
      const err = proc.rings.stderr.from(cursor);
      const stream: Stream | undefined = out && (!err || out.seq < err.seq) ? "stdout" : err ? "stderr" : undefined;
      if (stream) {
        const chunk = (stream === "stdout" ? out : err)!;
        droppedBytes += Math.max(0, chunk.offset - delivered[stream]);
        onChunk(stream, chunk.data);
        delivered[stream] = chunk.offset + chunk.data.length;
        cursor = chunk.seq + 1;
        if (flow?.full()) await Promise.race([flow.drained(), aborted]);
        continue;
      }
      if (proc.exit) {
        for (const s of ["stdout", "stderr"] as const) droppedBytes += Math.max(0, proc.rings[s].total - delivered[s]);
        const { endedAtMs: _, ...exit } = proc.exit;
        return { pid: proc.pid, ...exit, droppedBytes };
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          proc.waiters.delete(wake);
          signal.removeEventListener("abort", wake);
          resolve();
        };
        proc.waiters.add(wake);
        signal.addEventListener("abort", wake, { once: true });
      });
    }
  }
}

/** E2B's environment for a user's process: the default PATH and who the user is; nothing of the agent's own. */
function loginEnv(user: GuestUser): Record<string, string> {
  return { PATH: DEFAULT_ENV.PATH, HOME: user.home, USER: user.name, LOGNAME: user.name };
}

function info(proc: Proc): ProcInfo {
  const exit = proc.exit;
  return {
    pid: proc.pid,
    ...proc.request,
    startedAtMs: proc.startedAtMs,
    running: !exit,
    exitCode: exit ? exit.exitCode : null,
    signal: exit ? exit.signal : null,
    timedOut: exit ? exit.timedOut : false,
    endedAtMs: exit ? exit.endedAtMs : null,
    stdoutBytes: proc.rings.stdout.total,
    stderrBytes: proc.rings.stderr.total,
    stdinOpen: proc.stdinOpen,
  };
}

function exitDetails(exit: Exit): Record<string, unknown> {
  return { exitCode: exit.exitCode, signal: exit.signal };
}

function killGroup(child: ChildProcessWithoutNullStreams, signal: ProcessSignal): boolean {
  if (child.pid === undefined) return false;
  try {
    process.kill(-child.pid, signal);
    return true;
  } catch {
    return child.kill(signal);
  }
}

function decodeBase64(value: unknown, name: string): Buffer {
  if (typeof value !== "string" || value.length % 4 !== 0 || !BASE64_RE.test(value)) {
    throw new AgentOpError("bad_request", `\`${name}\` must be base64`);
  }
  return Buffer.from(value, "base64");
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
