// Transport-independent agent core: takes decoded request frames, runs them, and
// sends response frames through a callback. The guest main wires it to the
// virtio-serial port; tests wire it to an in-memory pair.

import { runFs } from "./ops/entries.js";
import { AgentOpError } from "./ops/errors.js";
import { JsEvaluator } from "./ops/eval.js";
import { type OutputFlow, runExec } from "./ops/exec.js";
import { runFiles } from "./ops/files.js";
import { applyIdentity, type IdentityDeps } from "./ops/identity.js";
import { type ProcessLimits, ProcessRegistry } from "./ops/processes.js";
import type { PythonWorker } from "./ops/python.js";
import { runWatch } from "./ops/watch.js";
import { AGENT_VERSION, type AgentErrorCode, MAX_CONCURRENT_CALLS, type RequestFrame, type ResponseFrame } from "./protocol.js";

export type Send = (frame: ResponseFrame) => void;

export type AgentServerOpts = {
  /** The warm Python worker, where the image has Python. */
  python?: PythonWorker;
  maxConcurrentCalls?: number;
  identity?: IdentityDeps;
  hostname?: () => string;
  /** Counters of the transport, reported by ping for diagnosis. */
  stats?: () => Record<string, unknown>;
  flow?: OutputFlow;
  /** Limits of the background-process registry (tests make them small). */
  processes?: Partial<ProcessLimits>;
};

type Running = { controller: AbortController; op: string };

export class AgentServer {
  private readonly running = new Map<number, Running>();
  private readonly startedAt = Date.now();
  private readonly evaluator = new JsEvaluator();
  private readonly processes: ProcessRegistry;
  private readonly maxConcurrentCalls: number;
  // Calls of a host that hung up: their frames are dropped, not queued for the next
  // host, which never asked for them and would count them as protocol violations.
  private readonly orphaned = new Set<number>();

  constructor(
    private readonly sendFrame: Send,
    private readonly opts: AgentServerOpts = {},
  ) {
    this.maxConcurrentCalls = opts.maxConcurrentCalls ?? MAX_CONCURRENT_CALLS;
    this.processes = new ProcessRegistry(opts.processes);
  }

  private send(frame: ResponseFrame): void {
    if (this.orphaned.has(frame.id)) {
      if (frame.kind !== "chunk") this.orphaned.delete(frame.id);
      return;
    }
    this.sendFrame(frame);
  }

  get inFlight(): number {
    return this.running.size;
  }

  /** A frame that failed to decode: answer it without an id we could trust. */
  rejectFrame(reason: string): void {
    this.send({ id: 0, kind: "error", code: "bad_frame", message: reason });
  }

  handle(message: unknown): void {
    if (!isObject(message) || typeof message.id !== "number" || !Number.isSafeInteger(message.id)) {
      this.rejectFrame("a request needs an integer `id` and an `op`");
      return;
    }
    const id = message.id;
    if (typeof message.op !== "string") {
      this.fail(id, "bad_request", "a request needs a string `op`");
      return;
    }
    const request = message as RequestFrame;
    if (request.op === "cancel") {
      const target = this.running.get(request.target);
      target?.controller.abort();
      this.send({ id, kind: "result", value: { cancelled: Boolean(target) } });
      return;
    }
    if (this.running.has(id)) {
      this.fail(id, "bad_request", `request id ${id} is already in flight`);
      return;
    }
    if (this.running.size >= this.maxConcurrentCalls) {
      this.fail(id, "agent_busy", `the agent already runs ${this.running.size} calls; retry when one finishes`);
      return;
    }
    if (request.op === "identity") {
      // Identity is a restored child's first call from its own host. Calls still running
      // were the parent's (a BRANCH taken mid-exec): they run on, but their output is
      // for a host this child never had, which would count it as unsolicited.
      for (const runningId of this.running.keys()) this.orphaned.add(runningId);
    }
    const controller = new AbortController();
    this.running.set(id, { controller, op: request.op });
    this.dispatch(id, request, controller.signal)
      .then((value) => this.send({ id, kind: "result", value }))
      .catch((err: unknown) => {
        if (err instanceof AgentOpError) this.fail(id, err.code, err.message, err.details);
        else this.fail(id, "io_error", err instanceof Error ? err.message : String(err));
      })
      .finally(() => this.running.delete(id));
  }

  private async dispatch(id: number, request: RequestFrame, signal: AbortSignal): Promise<unknown> {
    switch (request.op) {
      case "ping":
        return {
          version: AGENT_VERSION,
          uptimeMs: Date.now() - this.startedAt,
          runtimes: this.opts.python ? ["javascript", "python"] : ["javascript"],
          hostname: this.opts.hostname?.() ?? "",
          inFlight: this.running.size - 1,
          ...(this.opts.stats ? { stats: this.opts.stats() } : {}),
        };
      case "exec":
        return runExec(
          request,
          signal,
          (stream, data) => this.send({ id, kind: "chunk", stream, data: data.toString("base64") }),
          this.opts.flow,
        );
      case "eval":
        if (request.language === "python") {
          if (!this.opts.python) {
            throw new AgentOpError(
              "bad_request",
              "language 'python' is not available in this image; it has: javascript (build an image with Python: forkd image build --name python)",
            );
          }
          if (typeof request.code !== "string") throw new AgentOpError("bad_request", "`code` must be a string");
          return this.opts.python.evaluate(request.code, request.timeoutMs ?? 30_000, signal);
        }
        return this.evaluator.evaluate(request, signal);
      case "files":
        return runFiles(request);
      case "fs":
        return runFs(request);
      case "watch":
        return runWatch(
          request,
          signal,
          (stream, data) => this.send({ id, kind: "chunk", stream, data: data.toString("base64") }),
          this.opts.flow,
        );
      case "identity":
        // A restored child's first call: attaches still running were its parent's host
        // following a process; nobody here follows it for them.
        for (const [runningId, call] of this.running) if (call.op === "proc_attach" && runningId !== id) call.controller.abort();
        return applyIdentity(request, this.opts.identity);
      case "proc_start":
        return this.processes.start(request);
      case "proc_list":
        return { processes: this.processes.list() };
      case "proc_kill":
        return this.processes.kill(request);
      case "proc_stdin":
        return this.processes.stdin(request);
      case "proc_attach":
        return this.processes.attach(
          request,
          signal,
          (stream, data) => this.send({ id, kind: "chunk", stream, data: data.toString("base64") }),
          this.opts.flow,
        );
      default:
        throw new AgentOpError("unknown_op", `unknown op '${(request as { op: string }).op}'`);
    }
  }

  private fail(id: number, code: AgentErrorCode, message: string, details?: Record<string, unknown>): void {
    this.send(details ? { id, kind: "error", code, message, details } : { id, kind: "error", code, message });
  }

  /** Abort everything in flight: used when the host side disconnects. */
  abortAll(): void {
    for (const [id, { controller }] of this.running) {
      this.orphaned.add(id);
      controller.abort();
    }
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
