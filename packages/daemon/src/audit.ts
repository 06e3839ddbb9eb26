import { createHash } from "node:crypto";
import fs from "node:fs";

export type AuditEntry = {
  ts: string;
  method: string;
  path: string;
  status: number;
  latency_ms: number;
  remote: string;
  user_agent: string;
  sandboxes?: string[];
  snapshots?: string[];
  error_code?: string;
  /** The cluster node a call was forwarded to (its own audit log has the call as it ran). */
  forwarded_to?: string;
} & AuditCall;

/**
 * What a call into a sandbox ran or touched: the command of an exec, the digest of
 * eval'd code, the path of a files call. Never file contents, stdin, env values or
 * the code itself: those may hold secrets, and an audit log is read by many.
 */
export type AuditCall = {
  exec?: { argv: string[] } | { cmd: string } | { invalid: true };
  eval?: { sha256: string; bytes: number; language?: string };
  file?: { action: string; path: string };
};

/** Long enough for any real command line, short enough that one request cannot bloat the log. */
const MAX_FIELD_CHARS = 4096;
const MAX_ARGV = 256;

const clip = (s: string) => (s.length > MAX_FIELD_CHARS ? `${s.slice(0, MAX_FIELD_CHARS)}…[${s.length} chars]` : s);

/**
 * The audit fields of a request to `route` (Fastify's route pattern) with `body`,
 * read as sent: a body the schema refused is described as far as it has the
 * right shape, and only the fields named above are ever looked at.
 */
export function describeCall(route: string | undefined, body: unknown): AuditCall {
  if (!route || typeof body !== "object" || body === null) return {};
  const b = body as Record<string, unknown>;
  if (route === "/v1/sandboxes/:id/exec" || route === "/v1/sandboxes/:id/exec/stream") {
    const argv = b.args ?? b.argv;
    if (Array.isArray(argv) && argv.every((a) => typeof a === "string")) {
      return { exec: { argv: (argv as string[]).slice(0, MAX_ARGV).map(clip) } };
    }
    if (typeof b.cmd === "string") return { exec: { cmd: clip(b.cmd) } };
    return { exec: { invalid: true } };
  }
  if (route === "/v1/sandboxes/:id/eval" && typeof b.code === "string") {
    return {
      eval: {
        sha256: createHash("sha256").update(b.code).digest("hex"),
        bytes: Buffer.byteLength(b.code),
        ...(typeof b.language === "string" ? { language: clip(b.language) } : {}),
      },
    };
  }
  if (route === "/v1/sandboxes/:id/files" && typeof b.action === "string" && typeof b.path === "string") {
    return { file: { action: clip(b.action), path: clip(b.path) } };
  }
  return {};
}

/** Something the daemon noticed outside any request: a guest that broke the agent protocol. */
export type AuditEvent = { ts: string; event: "sandbox_unhealthy"; sandboxes: string[]; reason: string };

/** Append-only JSON lines. Reopened on SIGHUP so logrotate can move the file away. Never given headers: no token can land here. */
export class AuditLog {
  private fd: number | undefined;

  constructor(readonly file: string | undefined) {
    this.open();
  }

  private open(): void {
    if (!this.file) return;
    this.fd = fs.openSync(this.file, "a", 0o600);
  }

  reopen(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
    this.open();
  }

  write(entry: AuditEntry | AuditEvent): void {
    if (this.fd === undefined) return;
    fs.writeSync(this.fd, `${JSON.stringify(entry)}\n`);
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }
}
