// E2B's error shape: `{"code": <HTTP status>, "message": "…"}`. The SDK reads the
// body's `code` (404 → SandboxNotFoundError, 409 on pause → "already paused", …)
// and retries 429/503 after Retry-After, so every control-plane failure leaves so.
import { isForkdError } from "@forkd/core";
import type { FastifyError, FastifyReply } from "fastify";
import { ZodError } from "zod";

type E2bErrorBody = { code: number; message: string };

/** A failure the E2B planes answer with their own status (not one of forkd's codes). */
export class E2bHttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly retryAfterS?: number,
  ) {
    super(message);
    this.name = "E2bHttpError";
  }
}

/** Any failure as E2B's status and message: forkd's typed errors keep their status from core's table. */
export function e2bErrorOf(err: unknown): { status: number; message: string; retryAfterS?: number } {
  if (err instanceof E2bHttpError)
    return { status: err.status, message: err.message, ...(err.retryAfterS ? { retryAfterS: err.retryAfterS } : {}) };
  if (isForkdError(err)) {
    // Over a limit (sandboxes, host memory, BRANCHes) is E2B's 429 with Retry-After: the SDK
    // waits and retries it within its request deadline, as it does against E2B's own limits.
    if (err.code === "over_limit") return { status: 429, message: err.message, retryAfterS: Number(err.details?.retry_after_s) || 5 };
    return { status: err.httpStatus, message: err.message };
  }
  if (err instanceof ZodError) return { status: 400, message: `invalid request: ${zodSummary(err)}` };
  const e = err as FastifyError & { validation?: unknown };
  if (e.validation || e.code === "FST_ERR_VALIDATION") return { status: 400, message: `invalid request: ${e.message}` };
  if (e.code === "FST_ERR_CTP_BODY_TOO_LARGE") return { status: 413, message: "request body too large" };
  if (e.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE") return { status: 415, message: "unsupported content type" };
  if (typeof e.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500) return { status: e.statusCode, message: e.message };
  return { status: 500, message: "internal error; see the forkd daemon's log" };
}

export function sendE2bError(reply: FastifyReply, status: number, message: string, retryAfterS?: number): FastifyReply {
  if (retryAfterS !== undefined) void reply.header("retry-after", String(retryAfterS));
  return reply.code(status).send({ code: status, message } satisfies E2bErrorBody);
}

/** "field: problem; field: problem" — never the value itself (it may be a secret env var). */
function zodSummary(err: ZodError): string {
  return err.issues
    .slice(0, 5)
    .map((i) => `${i.path.join(".") || "body"}: ${i.message}`)
    .join("; ");
}
