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
};

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
