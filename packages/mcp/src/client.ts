// How the MCP server reaches the daemon: forkd's FORKD_URL / FORKD_TOKEN, or the
// local unix socket. A small client of its own rather than the SDK's Controller:
// the tools forward forkd's wire shapes as they come and must show the daemon's
// whole error body (message, code, remediation), which the Controller folds away.
import fs from "node:fs";
import path from "node:path";
import { Agent } from "undici";

export type DaemonTarget = {
  /** Base URL requests go to (for a unix socket, a placeholder host). */
  base: string;
  /** Set when the daemon is reached over its unix socket. */
  socketPath?: string;
  token?: string;
  /** What to call it in messages: the URL, or unix:PATH. */
  label: string;
};

export const DEFAULT_URL = "http://127.0.0.1:8889";

function loopbackUrl(url: string): boolean {
  try {
    const host = new URL(url).hostname;
    return host === "localhost" || host === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(host);
  } catch {
    return false;
  }
}

/**
 * FORKD_URL (http(s)://host:port or unix:/path) and FORKD_TOKEN as forkd's clients
 * read them; unset, the local socket ($FORKD_RUN_DIR/forkd.sock) when it exists,
 * else forkd's default URL.
 */
export function resolveTarget(env: NodeJS.ProcessEnv = process.env): DaemonTarget {
  let token = env.FORKD_TOKEN?.trim() || undefined;
  const url = env.FORKD_URL?.trim();
  let target: DaemonTarget;
  if (url?.startsWith("unix:")) {
    const socketPath = url.slice("unix:".length);
    target = { base: "http://forkd", socketPath, label: url };
  } else if (url) {
    const base = url.replace(/\/+$/, "");
    target = { base, label: base };
  } else {
    const socketPath = env.FORKD_SOCKET ?? path.join(env.FORKD_RUN_DIR ?? "/run/forkd", "forkd.sock");
    target = fs.existsSync(socketPath)
      ? { base: "http://forkd", socketPath, label: `unix:${socketPath}` }
      : { base: DEFAULT_URL, label: DEFAULT_URL };
  }
  // The local token file is offered only to a local daemon: sending it to a remote
  // FORKD_URL would hand this host's credential to another machine.
  if (!token && (target.socketPath || loopbackUrl(target.base))) {
    try {
      token = fs.readFileSync(path.join(env.FORKD_HOME ?? "/var/lib/forkd", "token"), "utf8").trim() || undefined;
    } catch {
      // none readable: the socket needs none, and a TCP daemon will say 401 with what to do
    }
  }
  return token ? { ...target, token } : target;
}

/** A failed daemon call, with the daemon's own message, code and remediation when it sent them. */
export class DaemonError extends Error {
  override readonly name = "DaemonError";
  constructor(
    /** HTTP status; 0 when the daemon could not be reached or did not answer in time. */
    readonly status: number,
    readonly code: string,
    message: string,
    readonly remediation?: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }

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

type RequestOpts = { timeoutMs?: number; signal?: AbortSignal };

export class DaemonClient {
  private readonly dispatcher: Agent | undefined;
  /** Timeout of a short call (FORKD_HTTP_TIMEOUT seconds, as forkd's MCP server reads it; 60 by default). */
  readonly defaultTimeoutMs: number;

  constructor(
    readonly target: DaemonTarget,
    opts: { defaultTimeoutMs?: number } = {},
  ) {
    this.dispatcher = target.socketPath ? new Agent({ connect: { socketPath: target.socketPath } }) : undefined;
    this.defaultTimeoutMs = opts.defaultTimeoutMs ?? 60_000;
  }

  static fromEnv(env: NodeJS.ProcessEnv = process.env): DaemonClient {
    const secs = Number(env.FORKD_HTTP_TIMEOUT);
    return new DaemonClient(resolveTarget(env), Number.isFinite(secs) && secs > 0 ? { defaultTimeoutMs: secs * 1000 } : {});
  }

  get<T = unknown>(route: string, opts?: RequestOpts): Promise<T> {
    return this.request("GET", route, undefined, opts);
  }
  post<T = unknown>(route: string, body?: unknown, opts?: RequestOpts): Promise<T> {
    return this.request("POST", route, body, opts);
  }
  delete<T = unknown>(route: string, opts?: RequestOpts): Promise<T> {
    return this.request("DELETE", route, undefined, opts);
  }

  async request<T = unknown>(method: string, route: string, body?: unknown, opts: RequestOpts = {}): Promise<T> {
    const headers: Record<string, string> = {};
    if (this.target.token) headers.authorization = `Bearer ${this.target.token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    const timeout = AbortSignal.timeout(timeoutMs);
    const signal = opts.signal ? AbortSignal.any([opts.signal, timeout]) : timeout;
    let res: Response;
    try {
      res = await fetch(`${this.target.base}${route}`, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        signal,
        // Node's fetch takes undici's dispatcher option.
        ...(this.dispatcher ? { dispatcher: this.dispatcher } : {}),
      } as RequestInit);
    } catch (err) {
      throw this.transportError(err, method, route, timeout.aborted ? timeoutMs : undefined, opts.signal?.aborted);
    }
    const text = await res.text();
    let json: unknown;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = undefined;
    }
    if (!res.ok) throw errorFromBody(res.status, json, text);
    return (json === undefined && text ? text : json) as T;
  }

  private transportError(err: unknown, method: string, route: string, timedOutAfterMs?: number, cancelled?: boolean): DaemonError {
    if (cancelled) return new DaemonError(0, "cancelled", `${method} ${route} was cancelled by the MCP client`);
    if (timedOutAfterMs !== undefined) {
      return new DaemonError(
        0,
        "timeout",
        `the forkd daemon at ${this.target.label} did not answer ${method} ${route} within ${Math.round(timedOutAfterMs / 1000)} s`,
        "the operation may still finish in the daemon: check with list_sandboxes / list_snapshots; raise FORKD_HTTP_TIMEOUT for slow calls",
      );
    }
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const why = cause?.code ?? cause?.message ?? (err as Error).message;
    return new DaemonError(
      0,
      "daemon_unreachable",
      `cannot reach the forkd daemon at ${this.target.label}: ${why}`,
      "start it with `forkd daemon`, or point FORKD_URL (and FORKD_TOKEN) at a running one",
    );
  }

  async close(): Promise<void> {
    await this.dispatcher?.close();
  }
}

/**
 * The daemon's error body: forkd's `{"error": "msg", "code", "remediation"}`, or the
 * older `{"error": {"code", "message"}}` our daemon answered with before; anything
 * else (a proxy's page, plain text) is shown as it came.
 */
export function errorFromBody(status: number, json: unknown, text: string): DaemonError {
  const body = (json && typeof json === "object" ? json : {}) as Record<string, unknown>;
  const str = (v: unknown) => (typeof v === "string" && v ? v : undefined);
  const obj = (v: unknown) => (v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);
  const nested = obj(body.error);
  const message = str(body.error) ?? str(nested?.message) ?? str(body.message) ?? (text.trim().slice(0, 500) || `HTTP ${status}`);
  const code = str(body.code) ?? str(nested?.code) ?? `http_${status}`;
  const remediation = str(body.remediation) ?? str(nested?.remediation);
  const details = obj(body.details) ?? obj(nested?.details);
  return new DaemonError(status, code, message, remediation, details);
}
