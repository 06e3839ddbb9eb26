// A typed client for QEMU's QMP: line-delimited JSON over a unix socket.
// Greeting, then qmp_capabilities, then `{execute, arguments, id}` answered by id,
// with asynchronous `{event}` lines in between.
import { EventEmitter } from "node:events";
import net from "node:net";
import { ForkdError } from "../common/errors.js";

export type QmpEvent = { event: string; data?: Record<string, unknown>; timestamp: { seconds: number; microseconds: number } };

export type QmpStatus =
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
  command: string;
};

export type QmpConnectOpts = { timeoutMs?: number; signal?: AbortSignal };

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;
  greeting: { QMP: { version: { qemu: { major: number; minor: number; micro: number } } } } | undefined;

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
      try {
        const socket = await connectUnix(socketPath);
        const client = new QmpClient(socket, socketPath);
        await client.handshake(Math.max(1000, deadline - Date.now()));
        return client;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code === "ENOENT" || code === "ECONNREFUSED") && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        throw new ForkdError("qmp_error", `could not connect to QMP at ${socketPath}: ${(err as Error).message}`, {}, { cause: err });
      }
    }
  }

  private handshake(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
      const onGreeting = (line: string) => {
        clearTimeout(timer);
        try {
          this.greeting = JSON.parse(line);
        } catch {
          reject(new Error(`QMP greeting is not JSON: ${line.slice(0, 200)}`));
          return;
        }
        this.attach();
        this.execute("qmp_capabilities", {}).then(() => resolve(), reject);
      };
      let early = "";
      const onData = (chunk: Buffer) => {
        early += chunk.toString("utf8");
        const newline = early.indexOf("\n");
        if (newline < 0) return;
        this.socket.off("data", onData);
        this.buffer = early.slice(newline + 1);
        onGreeting(early.slice(0, newline));
      };
      this.socket.on("data", onData);
      this.socket.once("close", () => {
        clearTimeout(timer);
        reject(new Error("QMP socket closed during the handshake"));
      });
    });
  }

  private attach(): void {
    this.socket.on("data", (chunk: Buffer) => {
      this.buffer += chunk.toString("utf8");
      let newline = this.buffer.indexOf("\n");
      while (newline >= 0) {
        const line = this.buffer.slice(0, newline).trim();
        this.buffer = this.buffer.slice(newline + 1);
        if (line) this.onLine(line);
        newline = this.buffer.indexOf("\n");
      }
    });
    this.socket.on("close", () => this.onClose());
    this.socket.on("error", () => this.onClose());
    // Leftover bytes that arrived with the greeting.
    if (this.buffer.includes("\n")) this.socket.emit("data", Buffer.alloc(0));
  }

  private onLine(line: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof message.event === "string") {
      this.emit("event", message as unknown as QmpEvent);
      return;
    }
    const id = message.id as number | undefined;
    if (id === undefined) return;
    const pending = this.pending.get(id);
    if (!pending) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if ("error" in message) {
      const error = message.error as { class: string; desc: string };
      pending.reject(new ForkdError("qmp_error", `QMP ${pending.command} failed: ${error.desc}`, { class: error.class }));
    } else {
      pending.resolve(message.return);
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      pending.reject(new ForkdError("qmp_error", `QMP connection closed while ${pending.command} was in flight`));
      this.pending.delete(id);
    }
    this.emit("close");
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<C extends QmpCommandName>(
    command: C,
    args: QmpCommands[C]["args"],
    opts: { timeoutMs?: number } = {},
  ): Promise<QmpCommands[C]["ret"]> {
    if (this.closed) return Promise.reject(new ForkdError("qmp_error", `QMP connection is closed; cannot run ${command}`));
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
