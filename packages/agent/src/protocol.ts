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
/**
 * The longest timeout one exec may ask for: the agent refuses more, and the REST API
 * (the daemon's schemas) answers 400 beyond it. One hour.
 */
export const MAX_EXEC_TIMEOUT_MS = 3_600_000;

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
export type EvalResult = {
  value: unknown;
  type: string;
  durationMs: number;
  stdout?: string;
  /** Python: the value's repr (what forkd's clients show as the result). */
  text?: string;
};

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

/**
 * The filesystem as E2B's envd presents it (`fs` op): paths may be relative to the
 * user's home or start with ~, and what is made belongs to `user` (default root).
 */
export type FsRequest =
  | { op: "fs"; action: "info"; path: string; user?: string }
  | { op: "fs"; action: "walk"; path: string; depth?: number; user?: string }
  | { op: "fs"; action: "mkdir"; path: string; user?: string }
  | { op: "fs"; action: "move"; path: string; to: string; user?: string }
  | { op: "fs"; action: "remove"; path: string; user?: string }
  /** Parents are made (owned by the user); the file is truncated first unless `append`. */
  | { op: "fs"; action: "write"; path: string; data: string; append?: boolean; user?: string }
  /** At most MAX_FILE_BYTES from `offset`; `size` in the answer is the whole file's. */
  | { op: "fs"; action: "read"; path: string; offset?: number; length?: number; user?: string };

export type FsEntry = {
  name: string;
  /** A symlink has its target's type ("other" when dangling); "symlink" only for a link whose target is a link. */
  type: "file" | "dir" | "symlink" | "other";
  path: string;
  size: number;
  /** Permission bits (0o777 at most), of the target for a symlink. */
  mode: number;
  /** Go's os.FileMode string of the entry itself: -rw-r--r--, drwxr-xr-x, Lrwxrwxrwx… */
  permissions: string;
  owner: string;
  group: string;
  mtimeMs: number;
  /** For a symlink: its target, fully resolved and absolute. */
  symlinkTarget?: string;
};

/**
 * Watch a directory (inotify, through fs.watch) until cancelled. Events arrive as
 * stdout chunks of JSON lines: first `{"type":"start","path":<the directory, absolute>}`,
 * then one line an event (`{"type":"create"|"write"|"remove"|"chmod","name":<path
 * relative to the directory>}`), and `{"type":"dropped","count":n}` when the host was
 * too slow to take n of them.
 */
export type WatchRequest = { op: "watch"; path: string; recursive?: boolean; user?: string };
/** Watches the agent keeps at once; more are refused with `agent_busy`. */
export const MAX_WATCHES = 32;

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

type CancelRequest = { op: "cancel"; target: number };

/** Background processes the agent runs at once; more are refused with `agent_busy`. */
export const MAX_BACKGROUND_PROCESSES = 64;
/** Exited background processes kept for list and attach (the oldest goes first), and for how long. */
export const MAX_EXITED_PROCESSES = 64;
export const EXITED_PROCESS_KEEP_MS = 10 * 60_000;
/** Recent output kept per stream of a background process, replayed to whoever attaches. */
export const PROCESS_OUTPUT_RING_BYTES = 1024 * 1024;
/** Largest stdin payload of one proc_stdin call, and the most a process may leave unread. */
export const MAX_PROCESS_STDIN_BYTES = 4 * 1024 * 1024;
/** Signals a host may send to a background process. */
export const PROCESS_SIGNALS = ["SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT"] as const;
export type ProcessSignal = (typeof PROCESS_SIGNALS)[number];

/**
 * Start a process that outlives the call: its stdin stays open (unless `stdinOpen` is
 * false: then it reads EOF at once), its output goes to a ring buffer. With `user` it
 * runs as that guest user (its uid, gid and groups), in that user's home unless `cwd`
 * says otherwise (a relative cwd is taken from the home), with E2B's environment:
 * PATH, HOME, USER and LOGNAME, then `env` over them.
 */
export type ProcStartRequest = Omit<ExecRequest, "op"> & { op: "proc_start"; tag?: string; user?: string; stdinOpen?: boolean };
type ProcListRequest = { op: "proc_list" };
export type ProcKillRequest = { op: "proc_kill"; pid: number; signal?: ProcessSignal };
/** base64 `data` written to the process's stdin; `eof` closes it after. */
export type ProcStdinRequest = { op: "proc_stdin"; pid: number; data?: string; eof?: boolean };
/**
 * Output kept so far as chunks (none with `fromNow`: only what the process writes
 * after the attach), then live output, then the exit as the result; a cancel detaches.
 */
export type ProcAttachRequest = { op: "proc_attach"; pid: number; fromNow?: boolean };

export type ProcInfo = {
  pid: number;
  argv?: string[];
  cmd?: string;
  cwd: string;
  env: Record<string, string>;
  tag?: string;
  /** The guest user it runs as, when one was asked for. */
  user?: string;
  startedAtMs: number;
  running: boolean;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  endedAtMs: number | null;
  stdoutBytes: number;
  stderrBytes: number;
  stdinOpen: boolean;
};
export type ProcKillResult = { pid: number; signal: ProcessSignal; signalled: boolean };
export type ProcStdinResult = { pid: number; bytes: number; stdinOpen: boolean };
export type ProcExit = {
  pid: number;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
  /** Output this attach never saw: it had left the ring buffer before it could be sent. */
  droppedBytes: number;
};

type AgentRequest =
  | { op: "ping" }
  | ExecRequest
  | EvalRequest
  | FilesRequest
  | IdentityRequest
  | CancelRequest
  | ProcStartRequest
  | ProcListRequest
  | ProcKillRequest
  | ProcStdinRequest
  | ProcAttachRequest
  | FsRequest
  | WatchRequest;

/**
 * `via: "runtime"`: answered by the JavaScript runtime even where a parked guest's native gate
 * could answer it (exec, files read/write/stat); both give the same answers.
 */
export type RequestFrame = AgentRequest & { id: number; via?: "runtime" };

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
  | "cancelled"
  /** A background process that has exited (or closed its stdin) was asked to do what only a running one can. */
  | "not_running";

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
 * with the next frame. A header announcing more than `maxFrameBytes` is refused from
 * the header alone, before any of its body is buffered; it cannot be skipped safely
 * (we would have to trust the length), so the decoder reports it and discards what
 * follows up to that length: a peer that cares must resynchronise by reconnecting.
 *
 * Work is linear in the bytes received: a frame that fits in one read is parsed in
 * place; a frame spread over reads gets one buffer of its announced size, which each
 * read is copied into once. (Re-joining the whole partial buffer on every read made a
 * 16 MiB frame in 64 KiB reads cost seconds; a list of read buffers would let a peer
 * that trickles single bytes cost an object per byte.)
 */
export class FrameDecoder {
  private readonly header = Buffer.alloc(4);
  private headerBytes = 0;
  private body: Buffer | undefined;
  private bodyBytes = 0;
  private skipBytes = 0;

  constructor(private readonly maxFrameBytes = MAX_FRAME_BYTES) {}

  push(chunk: Buffer): DecodedFrame[] {
    const out: DecodedFrame[] = [];
    let offset = 0;
    while (offset < chunk.length) {
      if (this.skipBytes > 0) {
        const skipped = Math.min(this.skipBytes, chunk.length - offset);
        this.skipBytes -= skipped;
        offset += skipped;
        continue;
      }
      if (this.body) {
        const n = Math.min(this.body.length - this.bodyBytes, chunk.length - offset);
        chunk.copy(this.body, this.bodyBytes, offset, offset + n);
        this.bodyBytes += n;
        offset += n;
        if (this.bodyBytes === this.body.length) {
          const body = this.body;
          this.body = undefined;
          this.bodyBytes = 0;
          out.push(parseBody(body));
        }
        continue;
      }
      let length: number;
      if (this.headerBytes === 0 && chunk.length - offset >= 4) {
        length = chunk.readUInt32BE(offset);
        offset += 4;
      } else {
        const n = Math.min(4 - this.headerBytes, chunk.length - offset);
        chunk.copy(this.header, this.headerBytes, offset, offset + n);
        this.headerBytes += n;
        offset += n;
        if (this.headerBytes < 4) break;
        this.headerBytes = 0;
        length = this.header.readUInt32BE(0);
      }
      if (length > this.maxFrameBytes) {
        out.push({ ok: false, error: `frame of ${length} bytes exceeds the ${this.maxFrameBytes}-byte limit` });
        this.skipBytes = length;
        continue;
      }
      if (chunk.length - offset >= length) {
        out.push(parseBody(chunk.subarray(offset, offset + length)));
        offset += length;
        continue;
      }
      this.body = Buffer.allocUnsafe(length);
      this.bodyBytes = 0;
    }
    return out;
  }

  /** Bytes held for a frame not yet complete (its header and body so far). */
  get pendingBytes(): number {
    return this.headerBytes + (this.body ? 4 + this.bodyBytes : 0);
  }

  /** The announced size of the frame in progress, or undefined between frames. */
  get pendingFrameBytes(): number | undefined {
    return this.body?.length;
  }
}

function parseBody(body: Buffer): DecodedFrame {
  try {
    return { ok: true, message: JSON.parse(body.toString("utf8")) };
  } catch {
    // Not the parser's message: it quotes the peer's bytes, and these reasons end up in logs and terminals.
    return { ok: false, error: `a frame of ${body.length} bytes is not valid JSON` };
  }
}

export type ParsedResponse = { ok: true; frame: ResponseFrame } | { ok: false; error: string };

const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;
const ERROR_CODE_RE = /^[a-z][a-z0-9_]{0,63}$/;
/** Longest agent error message passed on; the rest is cut (the agent's own are a line or two). */
const MAX_ERROR_MESSAGE_CHARS = 8192;

/**
 * Check a decoded frame from the guest against the shape of a ResponseFrame. The
 * host runs this on every frame before touching a field: the guest is untrusted, and
 * a `null`, an array or an id that is a string must be refused, not dereferenced.
 */
export function parseResponseFrame(message: unknown): ParsedResponse {
  if (typeof message !== "object" || message === null || Array.isArray(message)) {
    return {
      ok: false,
      error: `a frame must be a JSON object, got ${message === null ? "null" : Array.isArray(message) ? "an array" : `a ${typeof message}`}`,
    };
  }
  const m = message as Record<string, unknown>;
  if (typeof m.id !== "number" || !Number.isSafeInteger(m.id) || m.id < 0)
    return { ok: false, error: "a frame's `id` must be a non-negative integer" };
  const id = m.id;
  switch (m.kind) {
    case "chunk":
      if (m.stream !== "stdout" && m.stream !== "stderr") return { ok: false, error: "a chunk's `stream` must be stdout or stderr" };
      if (typeof m.data !== "string" || m.data.length % 4 !== 0 || !BASE64_RE.test(m.data)) {
        return { ok: false, error: "a chunk's `data` must be base64" };
      }
      return { ok: true, frame: { id, kind: "chunk", stream: m.stream, data: m.data } };
    case "result":
      if (!("value" in m)) return { ok: false, error: "a result needs a `value`" };
      return { ok: true, frame: { id, kind: "result", value: m.value } };
    case "error": {
      if (typeof m.code !== "string" || !ERROR_CODE_RE.test(m.code))
        return { ok: false, error: "an error's `code` must be a short snake_case string" };
      if (typeof m.message !== "string") return { ok: false, error: "an error's `message` must be a string" };
      if (m.details !== undefined && (typeof m.details !== "object" || m.details === null || Array.isArray(m.details))) {
        return { ok: false, error: "an error's `details` must be an object" };
      }
      const text = m.message.length > MAX_ERROR_MESSAGE_CHARS ? `${m.message.slice(0, MAX_ERROR_MESSAGE_CHARS)}…` : m.message;
      const code = m.code as AgentErrorCode;
      return {
        ok: true,
        frame:
          m.details === undefined
            ? { id, kind: "error", code, message: text }
            : { id, kind: "error", code, message: text, details: m.details as Record<string, unknown> },
      };
    }
    default:
      return { ok: false, error: "a frame's `kind` must be chunk, result or error" };
  }
}
