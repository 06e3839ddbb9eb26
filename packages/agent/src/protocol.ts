// Wire protocol between the host (core) and the guest agent.
// Frames are a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
// Length-prefixing (rather than newline-delimited JSON) lets a reader reject an
// oversized frame from its header alone, before buffering it.

export const AGENT_VERSION = "0.1.0";
export const AGENT_PORT_NAME = "forkd.agent";

/** Largest frame either side accepts; file contents travel base64-encoded inside frames. */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;
/** Largest file payload for one `files` read/write call (base64 grows it by 4/3). */
export const MAX_FILE_BYTES = 8 * 1024 * 1024;
/** Calls the agent runs at once; more are refused with `agent_busy`. */
export const MAX_CONCURRENT_CALLS = 64;
export const MAX_EXEC_TIMEOUT_MS = 24 * 60 * 60 * 1000;

export type ExecRequest = {
  op: "exec";
  /** argv form: no shell involved. */
  argv?: string[];
  /** shell form: run with /bin/sh -c. */
  cmd?: string;
  env?: Record<string, string>;
  cwd?: string;
  /** base64 stdin, closed after writing. */
  stdin?: string;
  timeoutMs?: number;
};
export type ExecResult = {
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
};

export type EvalRequest = { op: "eval"; code: string; language?: "javascript" | "python"; timeoutMs?: number };
export type EvalResult = { value: unknown; type: string; durationMs: number; stdout?: string };

export type FilesRequest =
  | { op: "files"; action: "read"; path: string }
  | { op: "files"; action: "write"; path: string; data: string; mode?: number; append?: boolean }
  | { op: "files"; action: "list"; path: string }
  | { op: "files"; action: "stat"; path: string }
  | { op: "files"; action: "mkdir"; path: string }
  | { op: "files"; action: "remove"; path: string; recursive?: boolean };

export type FileEntry = {
  name: string;
  type: "file" | "dir" | "symlink" | "other";
  size: number;
  mode: number;
  mtimeMs: number;
};

export type IdentityRequest = {
  op: "identity";
  hostname?: string;
  /** base64 entropy mixed into the guest RNG. */
  entropy?: string;
  /** host wall clock, ms since epoch. */
  clockMs?: number;
};

export type PingResult = {
  version: string;
  uptimeMs: number;
  runtimes: string[];
  hostname: string;
  inFlight: number;
  stats?: Record<string, unknown>;
};

export type CancelRequest = { op: "cancel"; target: number };

export type AgentRequest = { op: "ping" } | ExecRequest | EvalRequest | FilesRequest | IdentityRequest | CancelRequest;

export type RequestFrame = AgentRequest & { id: number };

export type ResponseFrame =
  | { id: number; kind: "chunk"; stream: "stdout" | "stderr"; data: string }
  | { id: number; kind: "result"; value: unknown }
  | { id: number; kind: "error"; code: AgentErrorCode; message: string; details?: Record<string, unknown> };

export type AgentErrorCode =
  | "bad_frame"
  | "bad_request"
  | "unknown_op"
  | "agent_busy"
  | "not_found"
  | "exists"
  | "not_a_directory"
  | "is_a_directory"
  | "permission_denied"
  | "too_large"
  | "timeout"
  | "eval_error"
  | "io_error"
  | "cancelled";

export function encodeFrame(message: unknown): Buffer {
  const body = Buffer.from(JSON.stringify(message), "utf8");
  if (body.length > MAX_FRAME_BYTES) {
    throw new RangeError(`frame of ${body.length} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
  }
  const header = Buffer.allocUnsafe(4);
  header.writeUInt32BE(body.length, 0);
  return Buffer.concat([header, body]);
}

export type DecodedFrame = { ok: true; message: unknown } | { ok: false; error: string };

/**
 * Incremental frame decoder. Feed it bytes as they arrive; it yields every complete
 * frame. A frame whose JSON does not parse yields `{ok:false}` and decoding goes on
 * with the next frame. A header announcing more than `maxFrameBytes` cannot be
 * skipped safely (we would have to trust the length), so the decoder reports it and
 * discards everything buffered: the peer must resynchronise by reconnecting.
 */
export class FrameDecoder {
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private skipBytes = 0;

  constructor(private readonly maxFrameBytes = MAX_FRAME_BYTES) {}

  push(chunk: Buffer): DecodedFrame[] {
    if (this.skipBytes > 0) {
      const skipped = Math.min(this.skipBytes, chunk.length);
      this.skipBytes -= skipped;
      chunk = chunk.subarray(skipped);
      if (chunk.length === 0) return [];
    }
    this.buffered.push(chunk);
    this.bufferedBytes += chunk.length;
    const out: DecodedFrame[] = [];
    let data = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered);
    let offset = 0;
    while (data.length - offset >= 4) {
      const length = data.readUInt32BE(offset);
      if (length > this.maxFrameBytes) {
        out.push({ ok: false, error: `frame of ${length} bytes exceeds the ${this.maxFrameBytes}-byte limit` });
        // Skip the oversized body so the stream stays aligned for the next frame.
        const available = data.length - offset - 4;
        if (available >= length) {
          offset += 4 + length;
          continue;
        }
        this.skipBytes = length - available;
        offset = data.length;
        break;
      }
      if (data.length - offset - 4 < length) break;
      const body = data.subarray(offset + 4, offset + 4 + length);
      offset += 4 + length;
      try {
        out.push({ ok: true, message: JSON.parse(body.toString("utf8")) });
      } catch (err) {
        out.push({ ok: false, error: `frame is not valid JSON: ${(err as Error).message}` });
      }
    }
    data = data.subarray(offset);
    this.buffered = data.length > 0 ? [data] : [];
    this.bufferedBytes = data.length;
    return out;
  }

  get pendingBytes(): number {
    return this.bufferedBytes;
  }
}
