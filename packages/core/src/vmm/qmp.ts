// A typed client for QEMU's QMP: line-delimited JSON over a unix socket.
// Greeting, then qmp_capabilities, then `{execute, arguments, id}` answered by id,
// with asynchronous `{event}` lines in between.
import { EventEmitter } from "node:events";
import net from "node:net";
import { StringDecoder } from "node:string_decoder";
import { ForkdError } from "../common/errors.js";

export type QmpEvent = { event: string; data?: Record<string, unknown>; timestamp: { seconds: number; microseconds: number } };

type QmpStatus =
  | "running"
  | "paused"
  | "postmigrate"
  | "prelaunch"
  | "finish-migrate"
  | "inmigrate"
  | "save-vm"
  | "restore-vm"
  | "shutdown"
  | "suspended"
  | "internal-error"
  | "io-error"
  | "debug"
  | "watchdog"
  | "guest-panicked"
  | "colo";

export type MigrationInfo = {
  status?:
    | "none"
    | "setup"
    | "cancelling"
    | "cancelled"
    | "active"
    | "postcopy-active"
    | "completed"
    | "failed"
    | "pre-switchover"
    | "device"
    | "wait-unplug";
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "setup-time"?: number;
  "error-desc"?: string;
  ram?: { transferred: number; total: number; "dirty-pages-rate"?: number };
};

/** The subset of QMP commands forkd uses, with their argument and return types. */
export type QmpCommands = {
  qmp_capabilities: { args: Record<string, never>; ret: Record<string, never> };
  "query-status": { args: Record<string, never>; ret: { status: QmpStatus; running: boolean } };
  "query-version": { args: Record<string, never>; ret: { qemu: { major: number; minor: number; micro: number }; package: string } };
  stop: { args: Record<string, never>; ret: Record<string, never> };
  cont: { args: Record<string, never>; ret: Record<string, never> };
  quit: { args: Record<string, never>; ret: Record<string, never> };
  "migrate-set-capabilities": {
    args: { capabilities: { capability: string; state: boolean }[] };
    ret: Record<string, never>;
  };
  "query-migrate-capabilities": { args: Record<string, never>; ret: { capability: string; state: boolean }[] };
  "migrate-set-parameters": { args: Record<string, unknown>; ret: Record<string, never> };
  migrate: { args: { uri: string; detach?: boolean }; ret: Record<string, never> };
  "migrate-incoming": { args: { uri: string }; ret: Record<string, never> };
  "query-migrate": { args: Record<string, never>; ret: MigrationInfo };
  migrate_cancel: { args: Record<string, never>; ret: Record<string, never> };
  getfd: { args: { fdname: string }; ret: Record<string, never> };
  "add-fd": { args: { fdset_id?: number; opaque?: string }; ret: { "fdset-id": number; fd: number } };
  "ringbuf-read": { args: { device: string; size: number; format?: "utf8" | "base64" }; ret: string };
  /** Device state without RAM to a file the VMM opens itself (live fork-to-many copies the RAM it needs apart). */
  "xen-save-devices-state": { args: { filename: string; live?: boolean }; ret: Record<string, never> };
};

export type QmpCommandName = keyof QmpCommands;

type Pending = {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  command: QmpCommandName;
};

// QEMU is as untrusted as its guest (a guest that escapes into it writes these
// lines), so QMP gets the agent channel's rules: every line is bounded, parsed
// without throwing, checked against the shape QMP documents, and a peer that
// breaks them loses the connection with a typed error. Nothing it sends can throw
// out of a socket listener or grow the daemon's memory without bound.

/** Longest QMP line accepted: the largest answer forkd asks for is a console ring read, JSON-escaped. */
export const MAX_QMP_LINE_CHARS = 4 * 1024 * 1024;
/** Asynchronous events QEMU may send in one second; QEMU's own are a handful per migration pass. */
export const MAX_QMP_EVENTS_PER_SECOND = 2000;
/** Answers to commands that already timed out, or lines without an id, per second. */
const MAX_QMP_STRAY_PER_SECOND = 200;

export type QmpConnectOpts = { timeoutMs?: number; signal?: AbortSignal };

type QmpGreeting = { QMP: { version: { qemu: { major: number; minor: number; micro: number } } } };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;
const isVersion = (v: unknown) => isObject(v) && isCount(v.major) && isCount(v.minor) && isCount(v.micro);

/** What each command's `return` must look like before a caller reads it; the rest answer `{}`. */
const RETURN_SHAPE: { [C in QmpCommandName]?: (v: unknown) => boolean } = {
  "query-status": (v) => isObject(v) && typeof v.status === "string" && typeof v.running === "boolean",
  "query-version": (v) => isObject(v) && isVersion(v.qemu) && typeof v.package === "string",
  "query-migrate-capabilities": (v) =>
    Array.isArray(v) && v.every((c) => isObject(c) && typeof c.capability === "string" && typeof c.state === "boolean"),
  "query-migrate": (v) =>
    isObject(v) &&
    (v.status === undefined || typeof v.status === "string") &&
    (v["error-desc"] === undefined || typeof v["error-desc"] === "string") &&
    (v.ram === undefined || (isObject(v.ram) && typeof v.ram.transferred === "number" && typeof v.ram.total === "number")),
  "add-fd": (v) => isObject(v) && isCount(v["fdset-id"]) && isCount(v.fd),
  "ringbuf-read": (v) => typeof v === "string",
};

/** Why a parsed QMP line is not a message QEMU could send, or undefined if it is one. */
function qmpShapeProblem(message: unknown): string | undefined {
  if (!isObject(message))
    return `a line that is not a JSON object (${message === null ? "null" : Array.isArray(message) ? "an array" : typeof message})`;
  if ("event" in message) {
    if (typeof message.event !== "string" || message.event.length > 128) return "an event whose name is not a short string";
    const ts = message.timestamp;
    if (!isObject(ts) || typeof ts.seconds !== "number" || typeof ts.microseconds !== "number")
      return `event ${message.event} without a timestamp`;
    if (message.data !== undefined && !isObject(message.data)) return `event ${message.event} whose data is not an object`;
    return undefined;
  }
  if ("error" in message) {
    const error = message.error;
    if (!isObject(error) || typeof error.class !== "string" || typeof error.desc !== "string")
      return "an error without a class and a description";
  } else if (!("return" in message)) {
    return "a line that is neither an event nor an answer";
  }
  if (message.id !== undefined && !isCount(message.id)) return "an answer whose id is not a whole number";
  return undefined;
}

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private buffer = "";
  private readonly decoder = new StringDecoder("utf8");
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;
  private violationReason: string | undefined;
  private windowStart = 0;
  private eventsInWindow = 0;
  private strayInWindow = 0;
  greeting: QmpGreeting | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
  ) {
    super();
    // Errors surface as `close` (which fails pending work); without a listener an error event would throw.
    socket.on("error", () => {});
  }

  /** Connect, read the greeting, and negotiate capabilities. Retries until the socket exists. */
  static async connect(socketPath: string, opts: QmpConnectOpts = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      opts.signal?.throwIfAborted();
      let client: QmpClient | undefined;
      try {
        const socket = await connectUnix(socketPath);
        client = new QmpClient(socket, socketPath);
        await client.handshake(Math.max(1000, deadline - Date.now()));
        return client;
      } catch (err) {
        client?.close();
        const code = (err as NodeJS.ErrnoException).code;
        if ((code === "ENOENT" || code === "ECONNREFUSED") && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        if (err instanceof ForkdError) throw err;
        throw new ForkdError("qmp_error", `could not connect to QMP at ${socketPath}: ${(err as Error).message}`, {}, { cause: err });
      }
    }
  }

  private handshake(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new ForkdError("qmp_error", `no QMP greeting from ${this.socketPath} within ${timeoutMs} ms`));
        this.close();
      }, timeoutMs);
      const onGreeting = (line: string) => {
        clearTimeout(timer);
        const greeting = parseJson(line);
        const qmp = isObject(greeting) ? greeting.QMP : undefined;
        if (!isObject(qmp) || !isObject(qmp.version) || !isVersion(qmp.version.qemu)) {
          this.violate(`a greeting that is not QMP's (${describeLine(line)})`);
          reject(new ForkdError("qmp_error", `${this.socketPath} did not greet like QMP: ${this.violationReason}`));
          return;
        }
        this.greeting = greeting as QmpGreeting;
        this.execute("qmp_capabilities", {}).then(() => resolve(), reject);
      };
      // Lines are read by the one data listener from the start; the first is the greeting.
      this.lineHandler = (line) => {
        this.lineHandler = (next) => this.onLine(next);
        onGreeting(line);
      };
      this.socket.on("data", (chunk: Buffer) => this.onData(chunk));
      this.socket.on("close", () => {
        clearTimeout(timer);
        reject(
          new ForkdError(
            "qmp_error",
            `QMP socket ${this.socketPath} closed during the handshake${this.violationReason ? ` (${this.violationReason})` : ""}`,
          ),
        );
        this.onClose();
      });
    });
  }

  private lineHandler: (line: string) => void = (line) => this.onLine(line);

  private onData(chunk: Buffer): void {
    if (this.closed) return;
    const scanned = this.buffer.length;
    this.buffer += this.decoder.write(chunk);
    // Only the new text can hold the next newline: a long line is not rescanned per chunk.
    let newline = this.buffer.indexOf("\n", scanned);
    while (newline >= 0 && !this.closed) {
      if (newline > MAX_QMP_LINE_CHARS) break;
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line) this.lineHandler(line);
      newline = this.buffer.indexOf("\n");
    }
    if (!this.closed && (newline > MAX_QMP_LINE_CHARS || (newline < 0 && this.buffer.length > MAX_QMP_LINE_CHARS))) {
      this.violate(`a line longer than ${MAX_QMP_LINE_CHARS} characters`);
    }
  }

  /** Count one more line of `kind` in this second; false once the budget for the second is spent. */
  private withinBudget(kind: "event" | "stray"): boolean {
    const now = performance.now();
    if (now - this.windowStart >= 1000) {
      this.windowStart = now;
      this.eventsInWindow = 0;
      this.strayInWindow = 0;
    }
    if (kind === "event") return ++this.eventsInWindow <= MAX_QMP_EVENTS_PER_SECOND;
    return ++this.strayInWindow <= MAX_QMP_STRAY_PER_SECOND;
  }

  private onLine(line: string): void {
    const message = parseJson(line);
    if (message === NOT_JSON) {
      this.violate(`a line that is not JSON (${describeLine(line)})`);
      return;
    }
    const problem = qmpShapeProblem(message);
    if (problem !== undefined) {
      this.violate(problem);
      return;
    }
    const msg = message as Record<string, unknown>;
    if (typeof msg.event === "string") {
      if (!this.withinBudget("event")) {
        this.violate(`more than ${MAX_QMP_EVENTS_PER_SECOND} events in one second`);
        return;
      }
      const event = msg as unknown as QmpEvent;
      // A listener's failure is its own: it must not throw out of the socket's data listener.
      // rawListeners: a once() wrapper removes itself when called.
      for (const listener of this.rawListeners("event")) safely(() => (listener as (e: QmpEvent) => void)(event));
      return;
    }
    const id = msg.id as number | undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (!pending) {
      // An answer to a command that timed out may still come; one for an id never sent cannot.
      if (id !== undefined && id >= this.nextId) {
        this.violate(`an answer for id ${id}, which was never sent`);
        return;
      }
      if (!this.withinBudget("stray")) this.violate(`more than ${MAX_QMP_STRAY_PER_SECOND} answers nobody waits for in one second`);
      return;
    }
    this.pending.delete(id!);
    clearTimeout(pending.timer);
    if ("error" in msg) {
      const error = msg.error as { class: string; desc: string };
      pending.reject(
        new ForkdError("qmp_error", `QMP ${pending.command} failed: ${error.desc.slice(0, 2000)}`, { class: error.class.slice(0, 200) }),
      );
      return;
    }
    const shape = RETURN_SHAPE[pending.command] ?? isObject;
    if (!shape(msg.return)) {
      const reason = `an answer to ${pending.command} that is not what QMP returns for it`;
      pending.reject(new ForkdError("qmp_error", `QEMU broke the QMP protocol: ${reason}`));
      this.violate(reason);
      return;
    }
    pending.resolve(msg.return);
  }

  /** The peer broke the protocol: it loses the connection, and every call waiting on it fails naming why. */
  private violate(reason: string): void {
    if (this.closed) return;
    this.violationReason = reason;
    this.socket.destroy();
    this.onClose();
  }

  /** Why the peer was disconnected, if it broke the protocol. */
  get violation(): string | undefined {
    return this.violationReason;
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.buffer = "";
    const why = this.violationReason
      ? `QEMU broke the QMP protocol (${this.violationReason}) and the connection was closed`
      : "QMP connection closed";
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      pending.reject(new ForkdError("qmp_error", `${why} while ${pending.command} was in flight`));
      this.pending.delete(id);
    }
    for (const listener of this.rawListeners("close")) safely(() => (listener as () => void)());
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<C extends QmpCommandName>(
    command: C,
    args: QmpCommands[C]["args"],
    opts: { timeoutMs?: number } = {},
  ): Promise<QmpCommands[C]["ret"]> {
    if (this.closed) {
      const why = this.violationReason ? ` (QEMU broke the protocol: ${this.violationReason})` : "";
      return Promise.reject(new ForkdError("qmp_error", `QMP connection is closed${why}; cannot run ${command}`));
    }
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? 30_000;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ForkdError("qmp_error", `QMP ${command} did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer, command });
      const payload = Object.keys(args).length > 0 ? { execute: command, arguments: args, id } : { execute: command, id };
      this.socket.write(`${JSON.stringify(payload)}\n`);
    });
  }

  /** Resolve on the next event of this name. */
  waitForEvent(name: string, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? 30_000;
      const timer = setTimeout(() => {
        cleanup();
        reject(new ForkdError("qmp_error", `QMP event ${name} did not arrive within ${timeoutMs} ms`));
      }, timeoutMs);
      const onEvent = (event: QmpEvent) => {
        if (event.event !== name) return;
        cleanup();
        resolve(event);
      };
      const onClose = () => {
        cleanup();
        reject(new ForkdError("qmp_error", `QMP connection closed while waiting for ${name}`));
      };
      const cleanup = () => {
        clearTimeout(timer);
        this.off("event", onEvent);
        this.off("close", onClose);
      };
      this.on("event", onEvent);
      this.on("close", onClose);
    });
  }

  close(): void {
    this.socket.destroy();
    this.onClose();
  }
}

const NOT_JSON = Symbol("not JSON");

function parseJson(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    return NOT_JSON;
  }
}

/** A hostile line, short enough to put in an error message. */
function describeLine(line: string): string {
  return JSON.stringify(line.length > 80 ? `${line.slice(0, 80)}…` : line);
}

function safely(work: () => void): void {
  try {
    work();
  } catch {
    // A listener's failure is its own; the connection goes on.
  }
}

function connectUnix(socketPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path: socketPath });
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}

export function eventTimeMs(event: QmpEvent): number {
  return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
}

/** Poll query-migrate until the migration completes; a failure or a timeout (which cancels it) throws, naming `what`. */
export async function waitForMigration(qmp: QmpClient, timeoutMs: number, what: string): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute("query-migrate", {});
    if (info.status === "completed") return info;
    if (info.status === "failed" || info.status === "cancelled") {
      throw new ForkdError("qmp_error", `${what} failed: ${info["error-desc"] ?? info.status}`);
    }
    if (Date.now() > deadline) {
      await qmp.execute("migrate_cancel", {}).catch(() => {});
      throw new ForkdError("vm_timeout", `${what} did not finish within ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}
