// Host side of the guest agent channel: many concurrent calls over one
// virtio-serial stream, matched by request id; exec output arrives as chunks.
import { randomInt } from "node:crypto";
import net from "node:net";
import {
  type EvalResult,
  type ExecRequest,
  type ExecResult,
  encodeFrame,
  type FilesRequest,
  FrameDecoder,
  type IdentityRequest,
  type PingResult,
  type ResponseFrame,
} from "@forkd/agent/protocol";
import { ForkdError } from "../common/errors.js";

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

type Call = {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  onChunk?: (stream: "stdout" | "stderr", data: Buffer) => void;
  timer?: NodeJS.Timeout;
  op: string;
};

export type CallOpts = { timeoutMs?: number; signal?: AbortSignal };
export type ExecOpts = CallOpts & { onStdout?: (data: Buffer) => void; onStderr?: (data: Buffer) => void };

export class AgentClient {
  private readonly decoder = new FrameDecoder();
  private readonly calls = new Map<number, Call>();
  // A fresh connection starts from a random id so answers still in flight for an
  // earlier connection's ids can never be mistaken for ours.
  private nextId = randomInt(1, 2 ** 30);
  private closed = false;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
  ) {
    socket.on("data", (chunk: Buffer) => {
      for (const frame of this.decoder.push(chunk)) {
        if (frame.ok) this.onFrame(frame.message as ResponseFrame);
      }
    });
    socket.on("close", () => this.failAll("the agent connection closed"));
    socket.on("error", () => this.failAll("the agent connection failed"));
  }

  static async connect(socketPath: string, opts: { timeoutMs?: number } = {}): Promise<AgentClient> {
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
        return new AgentClient(socket, socketPath);
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

  private onFrame(frame: ResponseFrame): void {
    const call = this.calls.get(frame.id);
    if (!call) return;
    if (frame.kind === "chunk") {
      call.onChunk?.(frame.stream, Buffer.from(frame.data, "base64"));
      return;
    }
    this.calls.delete(frame.id);
    if (call.timer) clearTimeout(call.timer);
    if (frame.kind === "result") call.resolve(frame.value);
    else call.reject(new AgentCallError(frame.code, frame.message, frame.details));
  }

  private failAll(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, call] of this.calls) {
      if (call.timer) clearTimeout(call.timer);
      call.reject(new ForkdError("agent_error", `${reason} while ${call.op} was in flight`));
      this.calls.delete(id);
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  call<T>(request: Record<string, unknown> & { op: string }, opts: CallOpts & { onChunk?: Call["onChunk"] } = {}): Promise<T> {
    if (this.closed) return Promise.reject(new ForkdError("agent_error", "the agent connection is closed"));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const call: Call = { resolve: resolve as (v: unknown) => void, reject, onChunk: opts.onChunk, op: request.op };
      const cancel = (reason: string, code: "vm_timeout" | "agent_error") => {
        if (!this.calls.has(id)) return;
        this.calls.delete(id);
        // Tell the agent to stop the work; its answer to the cancel is not awaited.
        this.socket.write(encodeFrame({ id: this.nextId++, op: "cancel", target: id }));
        reject(new ForkdError(code, reason));
      };
      if (opts.timeoutMs !== undefined) {
        call.timer = setTimeout(
          () => cancel(`agent ${request.op} did not answer within ${opts.timeoutMs} ms`, "vm_timeout"),
          opts.timeoutMs,
        );
      }
      opts.signal?.addEventListener("abort", () => cancel(`agent ${request.op} was aborted`, "agent_error"), { once: true });
      this.calls.set(id, call);
      let frame: Buffer;
      try {
        frame = encodeFrame({ ...request, id });
      } catch (err) {
        this.calls.delete(id);
        if (call.timer) clearTimeout(call.timer);
        reject(new ForkdError("too_large", (err as Error).message));
        return;
      }
      this.socket.write(frame);
    });
  }

  ping(opts?: CallOpts): Promise<PingResult> {
    return this.call({ op: "ping" }, opts);
  }

  exec(request: Omit<ExecRequest, "op">, opts: ExecOpts = {}): Promise<ExecResult> {
    return this.call(
      { op: "exec", ...request },
      {
        ...opts,
        onChunk: (stream, data) => (stream === "stdout" ? opts.onStdout?.(data) : opts.onStderr?.(data)),
      },
    );
  }

  eval(code: string, opts: CallOpts & { evalTimeoutMs?: number; language?: "javascript" | "python" } = {}): Promise<EvalResult> {
    return this.call(
      {
        op: "eval",
        code,
        ...(opts.evalTimeoutMs ? { timeoutMs: opts.evalTimeoutMs } : {}),
        ...(opts.language ? { language: opts.language } : {}),
      },
      opts,
    );
  }

  files<T = unknown>(request: DistributiveOmit<FilesRequest, "op">, opts?: CallOpts): Promise<T> {
    return this.call({ op: "files", ...(request as Record<string, unknown>) }, opts);
  }

  identity(request: Omit<IdentityRequest, "op">, opts?: CallOpts): Promise<{ applied: string[] }> {
    return this.call({ op: "identity", ...request }, opts);
  }

  close(): void {
    this.socket.destroy();
    this.failAll("the agent connection was closed by the host");
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
    case "timeout":
      return "vm_timeout";
    default:
      return "agent_error";
  }
}

export type { EvalResult, ExecResult, PingResult };
