// One NDJSON output stream for exec/stream and a background process's output:
// a line per chunk, bounded for a client that reads slower than the guest writes
// (past STREAM_BUFFER_BYTES output is dropped and a `truncated` line says how
// much), ended with an exit or error line; a client that leaves aborts `signal`.
import { PassThrough } from "node:stream";
import { isForkdError } from "@forkd/core";
import type { FastifyReply } from "fastify";

/** What one slow or stalled client may cost the daemon, and no more. */
const STREAM_BUFFER_BYTES = 1024 * 1024;

export type OutputStream = {
  /** Aborted when the client goes away before the last line. */
  signal: AbortSignal;
  onStdout: (d: Buffer) => void;
  onStderr: (d: Buffer) => void;
  /** Whether any output was dropped for this client. */
  truncated: () => boolean;
  line: (obj: unknown) => void;
  /** The work's outcome: its exit line (after any pending truncation note), or an error line; then the end. */
  finish: (work: Promise<Record<string, unknown>>) => void;
};

export function openOutputStream(reply: FastifyReply): OutputStream {
  const out = new PassThrough();
  const line = (obj: unknown) => {
    if (!out.writableEnded && !out.destroyed) out.write(`${JSON.stringify(obj)}\n`);
  };
  let dropped = 0;
  let truncated = false;
  const flushDropped = () => {
    if (dropped === 0) return;
    line({ type: "truncated", dropped_bytes: dropped });
    dropped = 0;
  };
  const output = (type: "stdout" | "stderr", d: Buffer) => {
    if (out.writableLength + out.readableLength >= STREAM_BUFFER_BYTES) {
      dropped += d.length;
      truncated = true;
      return;
    }
    flushDropped();
    line({ type, data: d.toString("base64") });
  };
  // The response, not the request: a request's close fires once its body is read.
  const abort = new AbortController();
  reply.raw.on("close", () => {
    if (reply.raw.writableFinished) return;
    abort.abort();
    out.destroy();
  });
  void reply.header("content-type", "application/x-ndjson").send(out);
  return {
    signal: abort.signal,
    onStdout: (d) => output("stdout", d),
    onStderr: (d) => output("stderr", d),
    truncated: () => truncated,
    line,
    finish: (work) => {
      work
        .then((exit) => {
          flushDropped();
          line({ type: "exit", ...exit });
        })
        .catch((e: Error) => line({ type: "error", error: { code: isForkdError(e) ? e.code : "internal", message: e.message } }))
        .finally(() => out.end());
    },
  };
}
