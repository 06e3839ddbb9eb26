// One error type for every failed daemon call, with the daemon's own message,
// code and remediation, so callers (and the MCP server's tools) can show them whole.

/**
 * An error the API answered with, or a call that got no answer: `code` is the
 * stable code, `status` the HTTP status (0 when the daemon could not be reached,
 * did not answer in time, or the caller cancelled), `remediation` what to do next.
 */
export class ForkdApiError extends Error {
  override readonly name = "ForkdApiError";
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: Record<string, unknown>,
    readonly remediation?: string,
  ) {
    super(message);
  }

  /** The daemon's error body shape (`{error, code, status?, remediation?, details?}`). */
  toJSON(): Record<string, unknown> {
    return {
      error: this.message,
      code: this.code,
      ...(this.status ? { status: this.status } : {}),
      ...(this.remediation ? { remediation: this.remediation } : {}),
      ...(this.details ? { details: this.details } : {}),
    };
  }
}

/**
 * The daemon's error body: forkd's `{"error": "msg", "code", "remediation"}`, or the
 * older `{"error": {"code", "message"}}` our daemon answered with before; anything
 * else (a proxy's page, plain text) is shown as it came.
 */
export function errorFromBody(status: number, json: unknown, text: string): ForkdApiError {
  const body = (json && typeof json === "object" ? json : {}) as Record<string, unknown>;
  const str = (v: unknown) => (typeof v === "string" && v ? v : undefined);
  const obj = (v: unknown) => (v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);
  const nested = obj(body.error);
  const message = str(body.error) ?? str(nested?.message) ?? str(body.message) ?? (text.trim().slice(0, 500) || `HTTP ${status}`);
  const code = str(body.code) ?? str(nested?.code) ?? `http_${status}`;
  const remediation = str(body.remediation) ?? str(nested?.remediation);
  const details = obj(body.details) ?? obj(nested?.details);
  return new ForkdApiError(status, code, message, details, remediation);
}
