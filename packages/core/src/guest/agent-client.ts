// Host side of the guest agent channel: many concurrent calls over one
// virtio-serial stream, matched by request id; exec output arrives as chunks.
//
// The guest is untrusted: every frame is checked against the protocol before any
// field is used, and a frame that breaks it (malformed, oversize, for a call that
// has finished or was never made, a flood after a cancel, an agent gone silent with
// a cancel outstanding) closes the channel and is reported once through
// onViolation. Nothing here throws out of a socket listener, and nothing a guest
// sends is buffered beyond one frame or a call's output limit.
import { randomInt } from "node:crypto";
import net from "node:net";
import {
  type EvalResult,
  type ExecRequest,
  type ExecResult,
  encodeFrame,
  type FilesRequest,
  FrameDecoder,
  type FsEntry,
  type FsRequest,
  type IdentityRequest,
  MAX_BACKGROUND_PROCESSES,
  MAX_EXITED_PROCESSES,
  type PingResult,
  type ProcExit,
  type ProcessSignal,
  type ProcInfo,
  type ProcKillResult,
  type ProcStartRequest,
  type ProcStdinResult,
  parseResponseFrame,
  type ResponseFrame,
} from "@forkd/agent/protocol";
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

function defaultMaxOutputBytes(): number {
  return setting("maxOutputBytes");
}

// How long an agent may stay silent, once a call has been cancelled, before the
// host gives up on it. Counted from the cancel or the last frame, whichever is later,
// so an agent that is merely busy draining output is never cut off (FORKD_AGENT_GRACE_MS).
function silenceGraceMs(): number {
  return setting("agentGraceMs");
}

// A host that hung up mid-call may leave frames queued in the guest that the next
// connection receives (as may a BRANCH taken mid-exec, for its children): a few are
// dropped, more are a flood. Output chunks are counted by size, other frames by number.
const FOREIGN_FRAME_BUDGET = 16;
const FOREIGN_OUTPUT_BUDGET_BYTES = 4 * 1024 * 1024;
const FOREIGN_OUTPUT_BUDGET_FRAMES = 1024;
// After a cancel, the agent may still send what it had queued for that call (it
// queues at most about 1 MiB); beyond this it is ignoring the cancel.
const CANCELLED_OUTPUT_BUDGET_BYTES = 8 * 1024 * 1024;
const CANCELLED_OUTPUT_BUDGET_FRAMES = 32_768;
// Cancelled ids still awaiting their last frame; the oldest is forgotten past this.
const MAX_RETIRED_IDS = 4096;

// After this long with nothing said either way, the guest's clock is set again (the
// agent's `clock` op) before the next call: a guest keeps time with its TSC, at the
// rate the host told it at boot, and that rate is only as good as the host's figure
// (FORKD_CLOCK_RESYNC_MS).
function clockResyncIdleMs(): number {
  return setting("clockResyncMs");
}

/**
 * How long the host waits on an exec that has no timeout of its own, or on a
 * process it follows: a day, longer than any exec may ask for (MAX_EXEC_TIMEOUT_MS),
 * and still never unbounded.
 */
const UNTIMED_CALL_DEADLINE_MS = 24 * 3_600_000;

/** Host-side deadline of a call nobody gave one: never unbounded. */
function defaultDeadlineMs(request: { op: string; timeoutMs?: unknown }): number {
  const own = typeof request.timeoutMs === "number" && request.timeoutMs > 0 ? request.timeoutMs : undefined;
  switch (request.op) {
    case "ping":
      return 10_000;
    case "exec":
      // The agent enforces the command's own timeout; the margin covers its answer.
      return (own ?? UNTIMED_CALL_DEADLINE_MS) + 30_000;
    case "eval":
      return (own ?? 30_000) + 10_000;
    case "identity":
      return 30_000;
    case "proc_attach":
    case "watch":
      // Follows a process until it exits (or a directory), which may be never; a detach (cancel) ends it sooner.
      return UNTIMED_CALL_DEADLINE_MS + 30_000;
    default:
      return 60_000;
  }
}

type OutputCap = {
  max: number;
  cancel: boolean;
  bytes: number;
  truncated: boolean;
  cancelSent: boolean;
  droppedBytes: number;
  droppedFrames: number;
};

type Call = {
  op: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  validate: (value: unknown) => string | undefined;
  onChunk?: (stream: "stdout" | "stderr", data: Buffer) => void;
  output?: OutputCap;
  timer?: NodeJS.Timeout;
  startedAt: number;
  cleanup?: () => void;
  /** A JavaScript eval runs on the agent's own loop: nothing else is answered meanwhile. */
  blocksAgent: boolean;
};

type Retired = { op: string; target?: number; chunkBytes: number; chunkFrames: number };

export type CallOpts = { timeoutMs?: number; signal?: AbortSignal };
export type ExecOpts = CallOpts & {
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
  /** Output delivered at most (stdout and stderr together); the rest is dropped. Infinity for none. */
  maxOutputBytes?: number;
  /** Past maxOutputBytes, cancel the command rather than let it run on with its output dropped. */
  cancelOnOutputLimit?: boolean;
};
export type ExecOutcome = ExecResult & { truncated: boolean };
export type ConnectOpts = { timeoutMs?: number; onViolation?: (reason: string) => void };

export class AgentClient {
  private readonly decoder = new FrameDecoder();
  private readonly calls = new Map<number, Call>();
  private readonly retired = new Map<number, Retired>();
  private readonly pendingCancels = new Set<number>();
  private readonly violationListeners: ((reason: string) => void)[] = [];
  // A fresh connection starts from a random id so answers still in flight for an
  // earlier connection's ids can never be mistaken for ours.
  private readonly firstId = randomInt(1, 2 ** 30);
  private nextId = this.firstId;
  private closed = false;
  private foreignFrames = 0;
  private foreignChunks = 0;
  private foreignChunkBytes = 0;
  private answered = false;
  private silentSince = 0;
  private silenceTimer: NodeJS.Timeout | undefined;
  private lastActivityAt = performance.now();
  private clockSync: Promise<void> | undefined;
  private clockUnsupported = false;
  private readonly clockResyncMs = clockResyncIdleMs();
  private readonly graceMs = silenceGraceMs();
  /** Why the channel was closed as hostile, if it was. */
  violation: string | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
  ) {
    socket.on("data", (chunk: Buffer) => {
      try {
        this.onData(chunk);
      } catch (err) {
        // Whatever went wrong, it went wrong on this guest's bytes: close its channel, never the process.
        this.violate(`a frame could not be handled (${(err as Error).message})`);
      }
    });
    socket.on("close", () => this.failAll((op) => `the agent connection closed while ${op} was in flight`));
    socket.on("error", () => this.failAll((op) => `the agent connection failed while ${op} was in flight`));
  }

  static async connect(socketPath: string, opts: ConnectOpts = {}): Promise<AgentClient> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection({ path: socketPath });
          s.once("connect", () => {
            s.off("error", reject);
            resolve(s);
          });
          s.once("error", reject);
        });
        socket.setNoDelay?.(true);
        const client = new AgentClient(socket, socketPath);
        if (opts.onViolation) client.onViolation(opts.onViolation);
        return client;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code === "ENOENT" || code === "ECONNREFUSED") && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        throw new ForkdError("agent_error", `could not connect to the agent socket ${socketPath}: ${(err as Error).message}`);
      }
    }
  }

  /** Be told (once) when the guest breaks the protocol; at once if it already has. */
  onViolation(listener: (reason: string) => void): void {
    if (this.violation !== undefined) {
      safely(() => listener(this.violation!));
      return;
    }
    this.violationListeners.push(listener);
  }

  private onData(chunk: Buffer): void {
    for (const decoded of this.decoder.push(chunk)) {
      if (this.closed) return;
      if (!decoded.ok) {
        this.violate(decoded.error);
        return;
      }
      const parsed = parseResponseFrame(decoded.message);
      if (!parsed.ok) {
        this.violate(parsed.error);
        return;
      }
      this.onFrame(parsed.frame);
    }
  }

  private onFrame(frame: ResponseFrame): void {
    const call = this.calls.get(frame.id);
    if (call) {
      this.heard();
      this.onCallFrame(frame.id, call, frame);
      return;
    }
    const retired = this.retired.get(frame.id);
    if (retired) {
      this.heard();
      if (frame.kind === "chunk") {
        retired.chunkBytes += base64Bytes(frame.data);
        retired.chunkFrames++;
        if (retired.chunkBytes > CANCELLED_OUTPUT_BUDGET_BYTES || retired.chunkFrames > CANCELLED_OUTPUT_BUDGET_FRAMES) {
          this.violate(`the agent kept sending output for ${retired.op} call ${frame.id} after it was cancelled`);
        }
        return;
      }
      this.retired.delete(frame.id);
      this.pendingCancels.delete(frame.id);
      return;
    }
    if (frame.id >= this.firstId && frame.id < this.nextId) {
      this.violate(`a ${frame.kind} frame for call ${frame.id}, which had already finished`);
      return;
    }
    if (frame.kind === "chunk") {
      this.foreignChunks++;
      this.foreignChunkBytes += base64Bytes(frame.data);
    } else {
      this.foreignFrames++;
    }
    if (
      this.foreignFrames > FOREIGN_FRAME_BUDGET ||
      this.foreignChunks > FOREIGN_OUTPUT_BUDGET_FRAMES ||
      this.foreignChunkBytes > FOREIGN_OUTPUT_BUDGET_BYTES
    ) {
      this.violate(`${this.foreignFrames + this.foreignChunks} frames for ids this connection never used (the last for id ${frame.id})`);
    }
  }

  private onCallFrame(id: number, call: Call, frame: ResponseFrame): void {
    if (frame.kind === "chunk") {
      if (!call.output) {
        this.violate(`an output chunk for a ${call.op} call, which has no output`);
        return;
      }
      const out = call.output;
      if (out.truncated) {
        out.droppedBytes += base64Bytes(frame.data);
        out.droppedFrames++;
        if (out.cancelSent && (out.droppedBytes > CANCELLED_OUTPUT_BUDGET_BYTES || out.droppedFrames > CANCELLED_OUTPUT_BUDGET_FRAMES)) {
          this.violate(`the agent kept sending output for exec call ${id} after it was cancelled`);
        }
        return;
      }
      let data = Buffer.from(frame.data, "base64");
      if (data.length > out.max - out.bytes) {
        data = data.subarray(0, out.max - out.bytes);
        out.truncated = true;
      }
      out.bytes += data.length;
      if (data.length > 0 && call.onChunk) {
        const onChunk = call.onChunk;
        const stream = frame.stream;
        safely(() => onChunk(stream, data));
      }
      if (out.truncated && out.cancel) {
        out.cancelSent = true;
        this.sendCancel(id);
      }
      return;
    }
    this.settle(id, call);
    if (frame.kind === "result") {
      const problem = call.validate(frame.value);
      if (problem !== undefined) {
        this.violate(`the answer to ${call.op} call ${id} ${problem}`);
        call.reject(new ForkdError("agent_error", `the agent's answer to ${call.op} ${problem}`));
        return;
      }
      call.resolve(call.output ? { ...(frame.value as object), truncated: call.output.truncated } : frame.value);
      return;
    }
    if (call.output?.cancelSent && frame.code === "cancelled") {
      // We cancelled it for its output: the caller gets what fitted, marked as cut short.
      call.resolve({
        exitCode: null,
        signal: "SIGKILL",
        timedOut: false,
        durationMs: performance.now() - call.startedAt,
        truncated: true,
      } satisfies ExecOutcome);
      return;
    }
    call.reject(new AgentCallError(frame.code, frame.message, frame.details));
  }

  /** A call is over for the host: its timer and abort listener go. */
  private settle(id: number, call: Call): void {
    this.calls.delete(id);
    if (call.timer) clearTimeout(call.timer);
    call.cleanup?.();
  }

  private heard(): void {
    this.answered = true;
    this.silentSince = performance.now();
    this.lastActivityAt = this.silentSince;
  }

  /** Set the guest's clock from ours, once for all the calls waiting on it; an agent without the op is left alone. */
  private syncClock(): Promise<void> {
    this.lastActivityAt = performance.now();
    this.clockSync ??= this.call({ op: "clock", clockMs: Date.now() }, { timeoutMs: 10_000 })
      .then(
        () => {},
        (err: unknown) => {
          if (err instanceof AgentCallError && err.agentCode === "unknown_op") this.clockUnsupported = true;
        },
      )
      .finally(() => {
        this.clockSync = undefined;
      });
    return this.clockSync;
  }

  private violate(reason: string): void {
    if (this.closed) return;
    this.violation = reason;
    this.socket.destroy();
    // Listeners first (they record the sandbox as unhealthy), so a caller retrying on
    // the rejection below already finds the sandbox marked.
    for (const listener of this.violationListeners.splice(0)) safely(() => listener(reason));
    this.failAll((op) => `the agent broke the protocol (${reason}); ${op} was abandoned and the channel closed`);
  }

  private failAll(message: (op: string) => string): void {
    if (this.closed) return;
    this.closed = true;
    if (this.silenceTimer) clearTimeout(this.silenceTimer);
    for (const [id, call] of [...this.calls]) {
      this.settle(id, call);
      call.reject(new ForkdError("agent_error", message(call.op)));
    }
    this.retired.clear();
    this.pendingCancels.clear();
  }

  private sendCancel(target: number): void {
    if (this.closed) return;
    const id = this.nextId++;
    this.retire(id, { op: "cancel", target, chunkBytes: 0, chunkFrames: 0 });
    if (this.pendingCancels.size === 0) this.silentSince = performance.now();
    this.pendingCancels.add(id);
    this.armSilenceCheck();
    this.socket.write(encodeFrame({ id, op: "cancel", target }));
  }

  private retire(id: number, entry: Retired): void {
    this.retired.set(id, entry);
    if (this.retired.size > MAX_RETIRED_IDS) {
      const oldest = this.retired.keys().next().value;
      if (oldest !== undefined) {
        this.retired.delete(oldest);
        this.pendingCancels.delete(oldest);
      }
    }
  }

  // An agent that has answered on this connection and then neither answers a cancel
  // nor sends anything else for the grace period is hung or hostile. Before its first
  // answer the guest may still be booting, so silence then proves nothing; nor while
  // a JavaScript eval is within its deadline (a synchronous one blocks the agent's
  // loop, and so every answer, for as long as its own timeout allows).
  private armSilenceCheck(): void {
    if (this.silenceTimer || this.closed) return;
    const check = () => {
      this.silenceTimer = undefined;
      if (this.closed || this.pendingCancels.size === 0) return;
      const silentMs = performance.now() - this.silentSince;
      const judging = this.answered && ![...this.calls.values()].some((c) => c.blocksAgent);
      if (judging && silentMs >= this.graceMs) {
        const pending = this.decoder.pendingBytes;
        this.violate(
          `the agent stopped answering: nothing for ${Math.round(silentMs / 1000)} s after a cancel${pending ? `, with ${pending} bytes of an unfinished frame` : ""}`,
        );
        return;
      }
      this.silenceTimer = setTimeout(check, judging ? Math.max(10, this.graceMs - silentMs) : this.graceMs);
      this.silenceTimer.unref();
    };
    this.silenceTimer = setTimeout(check, this.graceMs);
    this.silenceTimer.unref();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  call<T>(
    request: Record<string, unknown> & { op: string },
    opts: CallOpts & {
      onChunk?: Call["onChunk"];
      output?: { max: number; cancel: boolean };
      validate?: (value: unknown) => string | undefined;
    } = {},
  ): Promise<T> {
    if (this.closed) {
      return Promise.reject(
        new ForkdError(
          "agent_error",
          this.violation ? `the agent broke the protocol (${this.violation}); its channel is closed` : "the agent connection is closed",
        ),
      );
    }
    if (request.op !== "clock" && request.op !== "identity" && !this.clockUnsupported) {
      if (this.clockSync || performance.now() - this.lastActivityAt > this.clockResyncMs) {
        return this.syncClock().then(() => this.call<T>(request, opts));
      }
    }
    this.lastActivityAt = performance.now();
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? defaultDeadlineMs(request);
    return new Promise<T>((resolve, reject) => {
      const call: Call = {
        op: request.op,
        resolve: resolve as (v: unknown) => void,
        reject,
        validate: opts.validate ?? isObjectValue,
        startedAt: performance.now(),
        blocksAgent: request.op === "eval" && request.language !== "python",
        ...(opts.onChunk ? { onChunk: opts.onChunk } : {}),
        ...(opts.output
          ? { output: { ...opts.output, bytes: 0, truncated: false, cancelSent: false, droppedBytes: 0, droppedFrames: 0 } }
          : {}),
      };
      const giveUp = (reason: string, code: "vm_timeout" | "agent_error") => {
        if (this.calls.get(id) !== call) return;
        this.settle(id, call);
        // Its late frames are expected: dropped, within a budget, not violations.
        this.retire(id, { op: request.op, chunkBytes: 0, chunkFrames: 0 });
        // Tell the agent to stop the work; its answer to the cancel is not awaited.
        this.sendCancel(id);
        reject(new ForkdError(code, reason));
      };
      call.timer = setTimeout(() => giveUp(`agent ${request.op} did not answer within ${timeoutMs} ms`, "vm_timeout"), timeoutMs);
      const signal = opts.signal;
      if (signal) {
        const onAbort = () => giveUp(`agent ${request.op} was aborted`, "agent_error");
        signal.addEventListener("abort", onAbort, { once: true });
        call.cleanup = () => signal.removeEventListener("abort", onAbort);
      }
      this.calls.set(id, call);
      let frame: Buffer;
      try {
        // `via: "runtime"` asks a parked guest's gate to hand the call to the JavaScript runtime.
        frame = encodeFrame(setting("agentNativeCalls") === "off" ? { ...request, id, via: "runtime" } : { ...request, id });
      } catch (err) {
        this.settle(id, call);
        reject(new ForkdError("too_large", (err as Error).message));
        return;
      }
      this.socket.write(frame);
      if (signal?.aborted) giveUp(`agent ${request.op} was aborted`, "agent_error");
    });
  }

  ping(opts?: CallOpts): Promise<PingResult> {
    return this.call({ op: "ping" }, { ...opts, validate: validatePing });
  }

  exec(request: Omit<ExecRequest, "op">, opts: ExecOpts = {}): Promise<ExecOutcome> {
    const { onStdout, onStderr, maxOutputBytes, cancelOnOutputLimit, ...callOpts } = opts;
    return this.call(
      { op: "exec", ...request },
      {
        ...callOpts,
        validate: validateExecResult,
        output: { max: maxOutputBytes ?? defaultMaxOutputBytes(), cancel: cancelOnOutputLimit === true },
        onChunk: (stream, data) => (stream === "stdout" ? onStdout?.(data) : onStderr?.(data)),
      },
    );
  }

  eval(code: string, opts: CallOpts & { evalTimeoutMs?: number; language?: "javascript" | "python" } = {}): Promise<EvalResult> {
    const { evalTimeoutMs, language, ...callOpts } = opts;
    return this.call(
      {
        op: "eval",
        code,
        ...(evalTimeoutMs ? { timeoutMs: evalTimeoutMs } : {}),
        ...(language ? { language } : {}),
      },
      { ...callOpts, validate: validateEvalResult },
    );
  }

  files<T = unknown>(request: DistributiveOmit<FilesRequest, "op">, opts?: CallOpts): Promise<T> {
    return this.call({ op: "files", ...(request as Record<string, unknown>) }, { ...opts, validate: isObjectValue });
  }

  identity(request: Omit<IdentityRequest, "op">, opts?: CallOpts): Promise<{ applied: string[] }> {
    return this.call({ op: "identity", ...request }, { ...opts, validate: validateIdentityResult });
  }

  /** Start a background process: it outlives this call and this connection. */
  procStart(request: Omit<ProcStartRequest, "op">, opts?: CallOpts): Promise<ProcInfo> {
    return this.call({ op: "proc_start", ...request }, { ...opts, validate: validateProcInfo });
  }

  procList(opts?: CallOpts): Promise<ProcInfo[]> {
    return this.call<{ processes: ProcInfo[] }>({ op: "proc_list" }, { ...opts, validate: validateProcList }).then((r) => r.processes);
  }

  procKill(pid: number, signal: ProcessSignal | undefined, opts?: CallOpts): Promise<ProcKillResult> {
    return this.call(
      { op: "proc_kill", pid, ...(signal ? { signal } : {}) },
      { ...opts, validate: (v) => validateProcKill(v, pid, signal ?? "SIGKILL") },
    );
  }

  /** `data` goes to the process's stdin; `eof` closes it after. */
  procStdin(pid: number, data: Buffer, eof: boolean, opts?: CallOpts): Promise<ProcStdinResult> {
    return this.call(
      { op: "proc_stdin", pid, ...(data.length ? { data: data.toString("base64") } : {}), ...(eof ? { eof: true } : {}) },
      { ...opts, validate: (v) => validateProcStdin(v, pid, data.length) },
    );
  }

  /**
   * The output a background process has kept, then its live output, then its exit.
   * Aborting `signal` detaches (the process runs on); so does the host leaving.
   */
  procAttach(
    pid: number,
    opts: Omit<ExecOpts, "cancelOnOutputLimit"> & { fromNow?: boolean } = {},
  ): Promise<ProcExit & { truncated: boolean }> {
    const { onStdout, onStderr, maxOutputBytes, fromNow, ...callOpts } = opts;
    return this.call(
      { op: "proc_attach", pid, ...(fromNow ? { fromNow: true } : {}) },
      {
        ...callOpts,
        validate: (v) => validateProcExit(v, pid),
        output: { max: maxOutputBytes ?? Number.POSITIVE_INFINITY, cancel: false },
        onChunk: (stream, data) => (stream === "stdout" ? onStdout?.(data) : onStderr?.(data)),
      },
    );
  }

  /** The filesystem as E2B's envd presents it; every entry the guest describes is checked. */
  fs<A extends FsRequest["action"]>(
    request: { action: A } & Omit<Extract<FsRequest, { action: A }>, "op" | "action">,
    opts?: CallOpts,
  ): Promise<FsAnswer[A]> {
    return this.call(
      { op: "fs", ...(request as Record<string, unknown>) },
      { ...opts, validate: (v) => validateFsAnswer(request.action, v) },
    );
  }

  /**
   * Follow a directory's changes until `signal` aborts (the promise then rejects) or
   * the agent ends the watch. Events come through onEvents as the agent's JSON lines,
   * at most `maxOutputBytes` of them in all (the rest is dropped).
   */
  watch(
    request: { path: string; recursive?: boolean; user?: string },
    opts: CallOpts & { onEvents: (lines: Buffer) => void; maxOutputBytes?: number },
  ): Promise<unknown> {
    const { onEvents, maxOutputBytes, ...callOpts } = opts;
    return this.call(
      { op: "watch", ...request },
      {
        ...callOpts,
        output: { max: maxOutputBytes ?? Number.POSITIVE_INFINITY, cancel: false },
        onChunk: (stream, data) => {
          if (stream === "stdout") onEvents(data);
        },
      },
    );
  }

  close(): void {
    this.socket.destroy();
    this.failAll((op) => `the agent connection was closed by the host while ${op} was in flight`);
  }
}

function safely(work: () => void): void {
  try {
    work();
  } catch {
    // A consumer's failure is its own; the channel goes on.
  }
}

/** Decoded size of a base64 string already checked to be well formed, without decoding it. */
function base64Bytes(data: string): number {
  const padding = data.endsWith("==") ? 2 : data.endsWith("=") ? 1 : 0;
  return (data.length / 4) * 3 - padding;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

const isFiniteNumber = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

function isObjectValue(value: unknown): string | undefined {
  return isObject(value) ? undefined : "is not an object";
}

function validatePing(value: unknown): string | undefined {
  if (!isObject(value)) return "is not an object";
  if (typeof value.version !== "string" || !isFiniteNumber(value.uptimeMs) || typeof value.hostname !== "string") {
    return "lacks a string version and hostname and a numeric uptimeMs";
  }
  if (value.runtimes !== undefined && !(Array.isArray(value.runtimes) && value.runtimes.every((r) => typeof r === "string"))) {
    return "has runtimes that are not strings";
  }
  return undefined;
}

function validateExecResult(value: unknown): string | undefined {
  if (!isObject(value)) return "is not an object";
  if (!(value.exitCode === null || Number.isSafeInteger(value.exitCode))) return "has an exitCode that is neither null nor an integer";
  if (!(value.signal === null || typeof value.signal === "string")) return "has a signal that is neither null nor a string";
  if (typeof value.timedOut !== "boolean" || !isFiniteNumber(value.durationMs)) return "lacks a boolean timedOut and a numeric durationMs";
  return undefined;
}

function validateEvalResult(value: unknown): string | undefined {
  if (!isObject(value) || !("value" in value)) return "is not an object with a value";
  if (typeof value.type !== "string" || !isFiniteNumber(value.durationMs)) return "lacks a string type and a numeric durationMs";
  if (value.stdout !== undefined && typeof value.stdout !== "string") return "has a stdout that is not a string";
  if (value.text !== undefined && typeof value.text !== "string") return "has a text that is not a string";
  return undefined;
}

function validateIdentityResult(value: unknown): string | undefined {
  if (!isObject(value) || !Array.isArray(value.applied) || !value.applied.every((a) => typeof a === "string")) {
    return "lacks an applied list of strings";
  }
  return undefined;
}

// Background processes, as the guest describes them. Every field is checked: a pid
// the guest made up is used in URLs and messages, and a list longer than the agent's
// own limits allow is not an agent of ours.
const MAX_GUEST_PID = 4_194_304;
const SIGNAL_RE = /^SIG[A-Z0-9+-]{1,12}$/;
const isPid = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) > 0 && (v as number) <= MAX_GUEST_PID;
const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;
const isStringArray = (v: unknown): v is string[] => Array.isArray(v) && v.every((x) => typeof x === "string");

function validateProcInfo(value: unknown): string | undefined {
  if (!isObject(value)) return "is not an object";
  if (!isPid(value.pid)) return `has a pid that is not an integer from 1 to ${MAX_GUEST_PID}`;
  const hasArgv = value.argv !== undefined;
  const hasCmd = value.cmd !== undefined;
  if (hasArgv === hasCmd) return "must have exactly one of argv and cmd";
  if (hasArgv && !(isStringArray(value.argv) && value.argv.length > 0)) return "has an argv that is not a non-empty array of strings";
  if (hasCmd && typeof value.cmd !== "string") return "has a cmd that is not a string";
  if (typeof value.cwd !== "string") return "has a cwd that is not a string";
  if (!isObject(value.env) || !Object.values(value.env).every((v) => typeof v === "string"))
    return "has an env that is not an object of strings";
  if (value.tag !== undefined && typeof value.tag !== "string") return "has a tag that is not a string";
  if (!isFiniteNumber(value.startedAtMs) || !(value.endedAtMs === null || isFiniteNumber(value.endedAtMs)))
    return "has start and end times that are not numbers";
  if (typeof value.running !== "boolean" || typeof value.timedOut !== "boolean" || typeof value.stdinOpen !== "boolean")
    return "lacks boolean running, timedOut and stdinOpen";
  if (!(value.exitCode === null || Number.isSafeInteger(value.exitCode))) return "has an exitCode that is neither null nor an integer";
  if (!(value.signal === null || (typeof value.signal === "string" && SIGNAL_RE.test(value.signal))))
    return "has a signal that is neither null nor a signal name";
  if (value.running && (value.exitCode !== null || value.signal !== null || value.endedAtMs !== null))
    return "is running with an exit status";
  if (!isCount(value.stdoutBytes) || !isCount(value.stderrBytes)) return "has output counts that are not non-negative integers";
  return undefined;
}

function validateProcList(value: unknown): string | undefined {
  if (!isObject(value) || !Array.isArray(value.processes)) return "lacks a processes array";
  const list = value.processes as unknown[];
  if (list.length > MAX_BACKGROUND_PROCESSES + MAX_EXITED_PROCESSES) return `lists ${list.length} processes, more than the agent keeps`;
  const pids = new Set<unknown>();
  for (const [i, entry] of list.entries()) {
    const problem = validateProcInfo(entry);
    if (problem) return `has a process (#${i}) that ${problem}`;
    pids.add((entry as ProcInfo).pid);
  }
  if (pids.size !== list.length) return "lists a pid twice";
  if (list.filter((p) => (p as ProcInfo).running).length > MAX_BACKGROUND_PROCESSES)
    return "lists more running processes than the agent allows";
  return undefined;
}

function validateProcKill(value: unknown, pid: number, signal: string): string | undefined {
  if (!isObject(value) || value.pid !== pid || value.signal !== signal || typeof value.signalled !== "boolean") {
    return `is not {pid: ${pid}, signal: ${signal}, signalled: boolean}`;
  }
  return undefined;
}

function validateProcStdin(value: unknown, pid: number, bytes: number): string | undefined {
  if (!isObject(value) || value.pid !== pid || value.bytes !== bytes || typeof value.stdinOpen !== "boolean") {
    return `is not {pid: ${pid}, bytes: ${bytes}, stdinOpen: boolean}`;
  }
  return undefined;
}

function validateProcExit(value: unknown, pid: number): string | undefined {
  if (!isObject(value) || value.pid !== pid) return `is not an exit of process ${pid}`;
  const problem = validateExecResult(value);
  if (problem) return problem;
  if (value.signal !== null && !SIGNAL_RE.test(value.signal as string)) return "has a signal that is not a signal name";
  if (!isCount(value.droppedBytes)) return "has a droppedBytes that is not a non-negative integer";
  return undefined;
}

/** What each `fs` action answers, once checked. */
type FsAnswer = {
  info: { entry: FsEntry };
  walk: { entries: FsEntry[] };
  mkdir: { entry: FsEntry };
  move: { entry: FsEntry };
  remove: { path: string };
  write: { entry: { name: string; type: "file"; path: string } };
  read: { path: string; size: number; data: string };
};

const FS_TYPES = new Set(["file", "dir", "symlink", "other"]);
const MAX_FS_ENTRIES = 10_000;
const MAX_GUEST_PATH_CHARS = 4096;
const MAX_GUEST_NAME_CHARS = 256;
const isGuestPath = (v: unknown): v is string => typeof v === "string" && v.startsWith("/") && v.length <= MAX_GUEST_PATH_CHARS;
const isGuestName = (v: unknown): v is string => typeof v === "string" && v.length <= MAX_GUEST_NAME_CHARS;

function fsEntryProblem(value: unknown): string | undefined {
  if (!isObject(value)) return "is not an object";
  if (!isGuestName(value.name) || !isGuestPath(value.path)) return "lacks a name and an absolute path of sane length";
  if (typeof value.type !== "string" || !FS_TYPES.has(value.type)) return "has a type that is not file, dir, symlink or other";
  if (!isCount(value.size) || !Number.isSafeInteger(value.mode) || (value.mode as number) < 0 || (value.mode as number) > 0o777)
    return "has a size or mode out of range";
  if (typeof value.permissions !== "string" || !/^[-dalTLDpSugct?]{1,14}[-rwx]{9}$/.test(value.permissions))
    return "has a permissions string that is not Go's";
  if (!isGuestName(value.owner) || !isGuestName(value.group)) return "lacks owner and group names";
  if (!isFiniteNumber(value.mtimeMs)) return "has no numeric mtimeMs";
  if (value.symlinkTarget !== undefined && !isGuestPath(value.symlinkTarget)) return "has a symlinkTarget that is not an absolute path";
  return undefined;
}

function validateFsAnswer(action: string, value: unknown): string | undefined {
  if (!isObject(value)) return "is not an object";
  switch (action) {
    case "info":
    case "mkdir":
    case "move": {
      const problem = fsEntryProblem(value.entry);
      return problem ? `has an entry that ${problem}` : undefined;
    }
    case "walk": {
      if (!Array.isArray(value.entries) || value.entries.length > MAX_FS_ENTRIES)
        return `lacks an entries array of at most ${MAX_FS_ENTRIES}`;
      for (const [i, entry] of value.entries.entries()) {
        const problem = fsEntryProblem(entry);
        if (problem) return `has an entry (#${i}) that ${problem}`;
      }
      return undefined;
    }
    case "remove":
      return isGuestPath(value.path) ? undefined : "lacks the path removed";
    case "write": {
      const e = value.entry;
      return isObject(e) && isGuestName(e.name) && isGuestPath(e.path) && e.type === "file" ? undefined : "lacks the file entry written";
    }
    case "read":
      if (!isGuestPath(value.path) || !isCount(value.size)) return "lacks a path and a size";
      if (typeof value.data !== "string" || value.data.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(value.data))
        return "has data that is not base64";
      return undefined;
    default:
      return "answers an action never asked for";
  }
}

/** An error the agent itself reported (bad request, file not found, eval exception…). */
export class AgentCallError extends ForkdError {
  constructor(
    readonly agentCode: string,
    message: string,
    details?: Record<string, unknown>,
  ) {
    super(agentCodeToForkd(agentCode), message, { agentCode, ...(details ?? {}) });
  }
}

function agentCodeToForkd(code: string): ForkdError["code"] {
  switch (code) {
    case "not_found":
      return "not_found";
    case "exists":
      return "conflict";
    case "bad_request":
    case "not_a_directory":
    case "is_a_directory":
    case "eval_error":
      return "bad_request";
    case "too_large":
      return "too_large";
    case "agent_busy":
      return "over_limit";
    case "not_running":
      return "invalid_state";
    case "timeout":
      return "vm_timeout";
    // The agent answered as it should: the guest's filesystem or kernel refused the request.
    case "permission_denied":
    case "io_error":
      return "guest_error";
    default:
      return "agent_error";
  }
}

export type { EvalResult, PingResult, ProcExit, ProcInfo };
