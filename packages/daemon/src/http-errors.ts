// How every failure leaves the daemon: core's one error table (ERROR_STATUS) gives
// the status of each ForkdError code; Fastify's own failures are mapped here.
import { ERROR_STATUS, isForkdError } from "@forkd/core";
import type { FastifyError } from "fastify";

/** Large enough for an 8 MiB file write (base64 grows it by a third), small enough to refuse abuse early. */
export const BODY_LIMIT_BYTES = 12 * 2 ** 20;

export function errorBody(code: string, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...(details && Object.keys(details).length ? { details } : {}) } };
}

/** Fastify's own failures (parsing, limits, content types) mapped onto our codes. */
export function classify(err: FastifyError & { validation?: unknown }): {
  status: number;
  code: string;
  message: string;
  details?: Record<string, unknown>;
} {
  if (isForkdError(err)) return { status: err.httpStatus, code: err.code, message: err.message, details: err.details };
  if (err.validation || err.code === "FST_ERR_VALIDATION") {
    return {
      status: ERROR_STATUS.validation_failed,
      code: "validation_failed",
      message: `request does not match the schema: ${err.message}`,
    };
  }
  switch (err.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return { status: 413, code: "too_large", message: `request body is larger than ${BODY_LIMIT_BYTES} bytes` };
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return { status: 415, code: "unsupported_media_type", message: "send JSON with Content-Type: application/json" };
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return { status: 400, code: "bad_request", message: "the JSON body is empty" };
    case "FST_ERR_CTP_INVALID_JSON_BODY":
      return { status: 400, code: "bad_request", message: `the body is not valid JSON: ${err.message}` };
  }
  if (err instanceof SyntaxError || err.statusCode === 400)
    return { status: 400, code: "bad_request", message: `malformed request: ${err.message}` };
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500)
    return { status: err.statusCode, code: "bad_request", message: err.message };
  return { status: 500, code: "internal", message: "internal error; see the daemon log" };
}
