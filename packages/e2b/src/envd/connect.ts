// The Connect protocol (connectrpc.com/docs/protocol) with its JSON codec, as E2B's
// SDKs speak it to envd: unary calls are one JSON body each way; a server stream's
// request and responses are envelopes (one flags byte, a big-endian uint32 length,
// then that many bytes of JSON), the last one flagged end-stream and carrying the
// error if any. Written here rather than taken from a protobuf runtime: the messages
// are few and small, and everything a client sends is checked by hand anyway.
import type { IncomingMessage, ServerResponse } from "node:http";

/** Connect's error codes, as they travel in JSON. */
export type ConnectCode =
  | "canceled"
  | "unknown"
  | "invalid_argument"
  | "deadline_exceeded"
  | "not_found"
  | "already_exists"
  | "permission_denied"
  | "resource_exhausted"
  | "failed_precondition"
  | "aborted"
  | "out_of_range"
  | "unimplemented"
  | "internal"
  | "unavailable"
  | "data_loss"
  | "unauthenticated";

/** The HTTP status a unary error travels with (the client reads the code from the body). */
const HTTP_STATUS: Record<ConnectCode, number> = {
  canceled: 499,
  unknown: 500,
  invalid_argument: 400,
  deadline_exceeded: 504,
  not_found: 404,
  already_exists: 409,
  permission_denied: 403,
  resource_exhausted: 429,
  failed_precondition: 400,
  aborted: 409,
  out_of_range: 400,
  unimplemented: 501,
  internal: 500,
  unavailable: 503,
  data_loss: 500,
  unauthenticated: 401,
};

export function httpStatusOf(code: ConnectCode): number {
  return HTTP_STATUS[code];
}

export class ConnectError extends Error {
  constructor(
    readonly code: ConnectCode,
    message: string,
  ) {
    super(message);
  }
}

/** The JSON body of a Connect error (unary) or of an end-stream message's `error`. */
function errorJson(err: ConnectError): { code: ConnectCode; message: string } {
  return { code: err.code, message: err.message };
}

const FLAG_COMPRESSED = 0x01;
export const FLAG_END_STREAM = 0x02;
const HEADER_BYTES = 5;

/** Largest request message accepted (envd's requests are paths, commands and small inputs). */
export const MAX_REQUEST_MESSAGE_BYTES = 8 * 1024 * 1024;

export function encodeEnvelope(flags: number, payload: Buffer): Buffer {
  const header = Buffer.allocUnsafe(HEADER_BYTES);
  header.writeUInt8(flags, 0);
  header.writeUInt32BE(payload.length, 1);
  return Buffer.concat([header, payload]);
}

export function messageEnvelope(message: unknown): Buffer {
  return encodeEnvelope(0, Buffer.from(JSON.stringify(message), "utf8"));
}

/** The last envelope of a stream: `{}` when it ended well, `{"error":…}` when not. */
export function endStreamEnvelope(error?: ConnectError, metadata?: Record<string, string>): Buffer {
  const body: Record<string, unknown> = {};
  if (error) body.error = errorJson(error);
  if (metadata && Object.keys(metadata).length > 0) {
    body.metadata = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, [v]]));
  }
  return encodeEnvelope(FLAG_END_STREAM, Buffer.from(JSON.stringify(body), "utf8"));
}

export type Envelope = { flags: number; payload: Buffer };

/**
 * Incremental envelope reader. A header announcing more than `maxMessageBytes` is
 * refused from the header alone, before its body is buffered; so is a compressed
 * message (no compression was offered) and any flag this protocol does not define.
 */
export class EnvelopeReader {
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;

  constructor(private readonly maxMessageBytes = MAX_REQUEST_MESSAGE_BYTES) {}

  push(chunk: Buffer): Envelope[] {
    this.buffered.push(chunk);
    this.bufferedBytes += chunk.length;
    const out: Envelope[] = [];
    for (;;) {
      if (this.bufferedBytes < HEADER_BYTES) return out;
      const head = this.peek(HEADER_BYTES);
      const flags = head.readUInt8(0);
      const length = head.readUInt32BE(1);
      if (flags & FLAG_COMPRESSED) throw new ConnectError("internal", "a compressed message was sent, but no compression was negotiated");
      if (flags & ~(FLAG_COMPRESSED | FLAG_END_STREAM))
        throw new ConnectError("invalid_argument", `an envelope has unknown flags 0x${flags.toString(16)}`);
      if (length > this.maxMessageBytes) {
        throw new ConnectError("resource_exhausted", `a message of ${length} bytes is over the ${this.maxMessageBytes}-byte limit`);
      }
      if (this.bufferedBytes < HEADER_BYTES + length) return out;
      const whole = this.take(HEADER_BYTES + length);
      out.push({ flags, payload: whole.subarray(HEADER_BYTES) });
    }
  }

  /** Bytes of an envelope begun but not finished. */
  get pendingBytes(): number {
    return this.bufferedBytes;
  }

  private peek(n: number): Buffer {
    if (this.buffered[0]!.length < n) this.buffered = [Buffer.concat(this.buffered)];
    return this.buffered[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    const all = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered);
    const taken = all.subarray(0, n);
    const rest = all.subarray(n);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedBytes = rest.length;
    return taken;
  }
}

/** Parse a JSON message; anything but an object is refused (proto3 messages are objects). */
function parseMessage(payload: Buffer | string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(typeof payload === "string" ? payload : payload.toString("utf8"));
  } catch {
    throw new ConnectError("invalid_argument", "the request message is not valid JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ConnectError("invalid_argument", "the request message must be a JSON object");
  }
  return value as Record<string, unknown>;
}

export type RpcKind = "unary" | "server_stream";

function mediaType(req: IncomingMessage): string {
  return (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
}

/** The content type a call of this kind must come with (JSON only: no protobuf binary here). */
function checkContentType(req: IncomingMessage, kind: RpcKind): void {
  const want = kind === "unary" ? "application/json" : "application/connect+json";
  const got = mediaType(req);
  if (got !== want) {
    throw new ConnectError("unimplemented", `this server speaks Connect with JSON only: send Content-Type ${want}, not '${got || "none"}'`);
  }
  const encoding = req.headers[kind === "unary" ? "content-encoding" : "connect-content-encoding"];
  if (encoding !== undefined && encoding !== "identity") {
    throw new ConnectError("unimplemented", `request compression '${String(encoding)}' is not supported`);
  }
}

/** Read the body, at most `maxBytes` of it; a longer one is refused as soon as it passes the limit. */
function readBody(req: IncomingMessage, maxBytes: number, signal?: AbortSignal): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let total = 0;
    let done = false;
    const finish = (err: Error | undefined) => {
      if (done) return;
      done = true;
      signal?.removeEventListener("abort", onAbort);
      if (err) reject(err);
      else resolve(Buffer.concat(chunks));
    };
    const onAbort = () => finish(new ConnectError("canceled", "the client went away"));
    signal?.addEventListener("abort", onAbort, { once: true });
    req.on("data", (chunk: Buffer) => {
      if (done) return;
      total += chunk.length;
      if (total > maxBytes) {
        finish(new ConnectError("resource_exhausted", `the request body is over the ${maxBytes}-byte limit`));
        req.resume();
        return;
      }
      chunks.push(chunk);
    });
    req.on("end", () => finish(undefined));
    req.on("error", (e) => finish(new ConnectError("canceled", `reading the request failed: ${e.message}`)));
  });
}

/** A unary request's message, or a server stream's one request envelope, decoded. */
export async function readRequest(
  req: IncomingMessage,
  kind: RpcKind,
  maxBytes = MAX_REQUEST_MESSAGE_BYTES,
): Promise<Record<string, unknown>> {
  checkContentType(req, kind);
  if (kind === "unary") return parseMessage(await readBody(req, maxBytes));
  const body = await readBody(req, maxBytes + HEADER_BYTES);
  return decodeStreamRequest(body, maxBytes);
}

/** A server stream's request body: exactly one message envelope, nothing after it. */
export function decodeStreamRequest(body: Buffer, maxBytes = MAX_REQUEST_MESSAGE_BYTES): Record<string, unknown> {
  const reader = new EnvelopeReader(maxBytes);
  const envelopes = reader.push(body);
  if (reader.pendingBytes > 0) throw new ConnectError("invalid_argument", "the request ends inside an envelope");
  const messages = envelopes.filter((e) => !(e.flags & FLAG_END_STREAM));
  if (messages.length !== 1 || envelopes.length !== 1) {
    throw new ConnectError(
      "invalid_argument",
      `a server-streaming call takes exactly one request message, got ${envelopes.length} envelopes`,
    );
  }
  return parseMessage(messages[0]!.payload);
}

/**
 * Connect-Timeout-Ms: a positive integer of at most 10 digits, or absent. A decimal
 * fraction is taken too (rounded up): E2B's Python SDK sends seconds × 1000 as a
 * float's text ("1500.0") when its timeout is not a whole number.
 */
export function parseTimeoutMs(value: string | string[] | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string" || !/^[0-9]{1,10}(\.[0-9]{1,9})?$/.test(value)) {
    throw new ConnectError("invalid_argument", "Connect-Timeout-Ms must be a positive integer of at most 10 digits");
  }
  const ms = Math.ceil(Number(value));
  if (ms <= 0) throw new ConnectError("invalid_argument", "Connect-Timeout-Ms must be positive");
  return ms;
}

/** E2B's Keepalive-Ping-Interval, in seconds; kept between 1 s and 10 min. */
export function parseKeepaliveMs(value: string | string[] | undefined, fallbackMs: number): number {
  if (typeof value !== "string" || !/^[0-9]{1,6}$/.test(value)) return fallbackMs;
  return Math.min(600, Math.max(1, Number(value))) * 1000;
}

export function sendUnary(res: ServerResponse, message: unknown): void {
  const body = Buffer.from(JSON.stringify(message), "utf8");
  res.writeHead(200, { "content-type": "application/json", "content-length": body.length });
  res.end(body);
}

export function sendUnaryError(res: ServerResponse, err: ConnectError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = Buffer.from(JSON.stringify(errorJson(err)), "utf8");
  res.writeHead(httpStatusOf(err.code), { "content-type": "application/json", "content-length": body.length });
  res.end(body);
}

/** What one slow client may hold of the daemon's memory on one stream. */
const STREAM_BUFFER_BYTES = 1024 * 1024;

/**
 * One server stream's response: the 200 and its content type at once, messages as
 * they come, and one end-stream message. Messages that would grow what the client
 * has not read past `maxBufferedBytes` are dropped and counted (droppable ones
 * only: output; the start and end always go), so a client that stops reading costs
 * a bounded amount. A client that goes away aborts `signal`.
 */
export class ServerStream {
  private readonly abort = new AbortController();
  private ended = false;
  private droppedBytes = 0;

  constructor(
    private readonly res: ServerResponse,
    private readonly maxBufferedBytes = STREAM_BUFFER_BYTES,
  ) {
    res.on("close", () => {
      if (!res.writableFinished) this.abort.abort();
      this.ended = true;
    });
    res.writeHead(200, { "content-type": "application/connect+json" });
    res.flushHeaders();
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  get isOpen(): boolean {
    return !this.ended;
  }

  /** Bytes of droppable messages not sent because the client was not reading. */
  get dropped(): number {
    return this.droppedBytes;
  }

  send(message: unknown, droppable = false): void {
    if (this.ended) return;
    const envelope = messageEnvelope(message);
    if (droppable && this.res.writableLength + envelope.length > this.maxBufferedBytes) {
      this.droppedBytes += envelope.length;
      return;
    }
    this.res.write(envelope);
  }

  end(error?: ConnectError, metadata?: Record<string, string>): void {
    if (this.ended) return;
    this.ended = true;
    const md = { ...(metadata ?? {}), ...(this.droppedBytes > 0 ? { "x-forkd-dropped-bytes": String(this.droppedBytes) } : {}) };
    this.res.end(endStreamEnvelope(error, md));
  }

  /** End at once without an end-stream message (the sandbox is gone: the client sees the connection drop). */
  destroy(): void {
    this.ended = true;
    this.res.destroy();
  }
}
