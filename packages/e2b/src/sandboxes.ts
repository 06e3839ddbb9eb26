// The E2B sandboxes the daemon serves. An E2B sandbox keeps its id across pause and
// resume while the forkd sandbox under it changes (a resume restores a new VM from
// the pause's snapshot), so the E2B id maps onto the current forkd sandbox here.
// Each record is one file under $FORKD_HOME/e2b/sandboxes (written atomically), so a
// daemon restart keeps paused sandboxes and the time limits of running ones.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { writeFileAtomic } from "@forkd/atomic";
import { E2bHttpError } from "./errors.js";

export type E2bSandboxState = "running" | "paused";

export type E2bSandboxRecord = {
  sandboxID: string;
  /** forkd's snapshot tag the sandbox was created from (E2B's template id). */
  templateID: string;
  /** The name it was asked for by (E2B's alias), when not the tag itself. */
  alias: string | null;
  clientID: string;
  /** The forkd sandbox running it; null while paused. */
  forkdId: string | null;
  /** While paused: the snapshot holding its memory, devices and disk. */
  pausedTag: string | null;
  /** Earlier captures (pauses, the live fork it came from) removed with it when no other sandbox uses them. */
  ownedTags: string[];
  /** Sent by the SDK as X-Access-Token on every envd request; checked by the envd plane. */
  envdAccessToken: string;
  /** Environment every process started through envd gets (E2B's envVars). */
  envVars: Record<string, string>;
  metadata: Record<string, string>;
  startedAtMs: number;
  /** The time limit: killed (or paused, with autoPause) when it passes. */
  endAtMs: number;
  autoPause: boolean;
  cpuCount: number;
  memoryMB: number;
  allowInternetAccess: boolean;
  allowOut: string[];
  denyOut: string[];
};

export function stateOf(record: Pick<E2bSandboxRecord, "forkdId">): E2bSandboxState {
  return record.forkdId ? "running" : "paused";
}

/** E2B's sandbox ids: lowercase letters and digits (theirs are 20 characters starting with a letter). */
const SANDBOX_ID_RE = /^[a-z0-9]{1,64}$/;

export function newE2bSandboxId(): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  const bytes = randomBytes(19);
  return `i${[...bytes].map((b) => alphabet[b % alphabet.length]).join("")}`;
}

export function newAccessToken(): string {
  return randomBytes(24).toString("hex");
}

/** Why a sandbox's envd streams must end now. */
export type GoneReason = "killed" | "paused";

export class E2bSandboxes {
  private readonly records = new Map<string, E2bSandboxRecord>();
  private readonly goneListeners = new Set<(sandboxID: string, reason: GoneReason) => void>();
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(private readonly dir: string) {}

  /** Read what a previous daemon left (unreadable or misnamed files are skipped, never trusted). */
  load(): E2bSandboxRecord[] {
    this.records.clear();
    let names: string[] = [];
    try {
      names = fs.readdirSync(this.dir);
    } catch {
      return [];
    }
    for (const name of names) {
      const m = /^([a-z0-9]{1,64})\.json$/.exec(name);
      if (!m) continue;
      try {
        const record = JSON.parse(fs.readFileSync(path.join(this.dir, name), "utf8")) as E2bSandboxRecord;
        if (record.sandboxID === m[1]) this.records.set(record.sandboxID, record);
      } catch {
        // A torn or foreign file is not a sandbox.
      }
    }
    return [...this.records.values()];
  }

  list(): E2bSandboxRecord[] {
    return [...this.records.values()];
  }

  get(sandboxID: string): E2bSandboxRecord | undefined {
    return SANDBOX_ID_RE.test(sandboxID) ? this.records.get(sandboxID) : undefined;
  }

  /** The record, or E2B's 404 (the SDK turns it into SandboxNotFoundError). */
  require(sandboxID: string): E2bSandboxRecord {
    const record = this.get(sandboxID);
    if (!record) throw new E2bHttpError(404, `sandbox ${String(sandboxID).slice(0, 64)} not found`);
    return record;
  }

  byForkdId(forkdId: string): E2bSandboxRecord | undefined {
    for (const r of this.records.values()) if (r.forkdId === forkdId) return r;
    return undefined;
  }

  async put(record: E2bSandboxRecord): Promise<void> {
    this.records.set(record.sandboxID, record);
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(path.join(this.dir, `${record.sandboxID}.json`), JSON.stringify(record), { mode: 0o600 });
  }

  async update(sandboxID: string, fields: Partial<Omit<E2bSandboxRecord, "sandboxID">>): Promise<E2bSandboxRecord> {
    const next = { ...this.require(sandboxID), ...fields };
    await this.put(next);
    return next;
  }

  remove(sandboxID: string): void {
    this.records.delete(sandboxID);
    fs.rmSync(path.join(this.dir, `${sandboxID}.json`), { force: true });
    this.gone(sandboxID, "killed");
  }

  /** Tell the envd plane a sandbox stopped serving (killed, expired, paused): its streams end at once. */
  gone(sandboxID: string, reason: GoneReason): void {
    for (const listener of this.goneListeners) listener(sandboxID, reason);
  }

  onGone(listener: (sandboxID: string, reason: GoneReason) => void): () => void {
    this.goneListeners.add(listener);
    return () => this.goneListeners.delete(listener);
  }

  /** One lifecycle change at a time per sandbox (pause, resume, kill, timeout never interleave). */
  async exclusive<T>(sandboxID: string, work: () => Promise<T>): Promise<T> {
    const before = this.locks.get(sandboxID) ?? Promise.resolve();
    const run = before.then(work, work);
    const tail = run.catch(() => {});
    this.locks.set(sandboxID, tail);
    try {
      return await run;
    } finally {
      if (this.locks.get(sandboxID) === tail) this.locks.delete(sandboxID);
    }
  }
}
