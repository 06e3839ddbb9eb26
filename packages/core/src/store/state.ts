// Sandbox state shared by every forkd process on the host: one SQLite file in
// WAL mode, so concurrent CLI invocations (and later the daemon) see the same
// sandboxes. Snapshots are not here: their manifests on disk are the registry.
import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import { forkdHome } from "../common/config.js";
import { ensureStateDir } from "../common/dirs.js";
import { claimableBranchStatuses, sandboxRowsAllowing, type WorkspaceState } from "./state-rules.js";

export type SandboxRow = {
  id: string;
  tag: string | null;
  image: string;
  pid: number;
  pid_start: string;
  run_dir: string;
  /**
   * "starting" from before its VMM is launched until its first answer (the intent:
   * start-up recovery kills and reaps it if its writer died); "running" once confirmed.
   * What each state (with `health`) allows is the table in state-rules.ts.
   */
  state: "starting" | "running";
  created_at: string;
  accel: string;
  memory_mib: number;
  vcpus: number;
  network: string;
  /** What its NIC may reach (net/policy.ts ApiNetworkPolicy), JSON-encoded; null for rows from before the egress policy. */
  network_policy?: string | null;
  memory_limit_mib: number | null;
  cgroup: string | null;
  /** Killed by the daemon's reaper (or `forkd cleanup`) after this time; null: no time limit. */
  expires_at_ms: number | null;
  /** User-supplied string pairs, JSON-encoded. */
  metadata: string | null;
  /** The tag of the hot pool this child waits in, unclaimed (store/pools.ts); null once handed out or never pooled. */
  pool?: string | null;
  /** "unhealthy" once its guest broke the agent protocol (never cleared: kill it); null while healthy. */
  health?: "unhealthy" | null;
  health_reason?: string | null;
  /** The process writing a "starting" row (its pid and start time): while it lives, nobody else touches the row. */
  owner_pid?: number | null;
  owner_start?: string | null;
  /** The VMM's own uid (confinement), recorded with the intent so recovery can drop its egress rules. */
  vmm_uid?: number | null;
};

export type BranchRow = {
  tag: string;
  source_id: string;
  mode: string;
  status: "writing" | "ready" | "failed";
  error: string | null;
  pause_ms: number | null;
  total_ms: number | null;
  owner_pid: number;
  created_at: string;
  /** The writer's start time (pids are reused); null on rows from before it was recorded. */
  owner_start?: string | null;
  /** 1 while the capture may have paused the source: recovery resumes it if the writer died then. */
  source_paused?: number | null;
};

export type StagedRow = { key: string; tag: string; path: string; bytes: number; last_used_ms: number };

const SCHEMA = `
CREATE TABLE IF NOT EXISTS sandboxes (
  id TEXT PRIMARY KEY,
  tag TEXT,
  image TEXT NOT NULL,
  pid INTEGER NOT NULL,
  pid_start TEXT NOT NULL,
  run_dir TEXT NOT NULL,
  state TEXT NOT NULL,
  created_at TEXT NOT NULL,
  accel TEXT NOT NULL,
  memory_mib INTEGER NOT NULL,
  vcpus INTEGER NOT NULL,
  network TEXT NOT NULL,
  memory_limit_mib INTEGER,
  cgroup TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_tag ON sandboxes(tag);
CREATE TABLE IF NOT EXISTS branches (
  tag TEXT PRIMARY KEY,
  source_id TEXT NOT NULL,
  mode TEXT NOT NULL,
  status TEXT NOT NULL,
  error TEXT,
  pause_ms REAL,
  total_ms REAL,
  owner_pid INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workspaces (
  name TEXT PRIMARY KEY,
  id TEXT NOT NULL,
  source_tag TEXT NOT NULL,
  state_tag TEXT,
  states TEXT NOT NULL,
  status TEXT NOT NULL,
  sandbox_id TEXT,
  memory_limit_mib INTEGER,
  created_ms INTEGER NOT NULL,
  last_active_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS staged (
  key TEXT PRIMARY KEY,
  tag TEXT NOT NULL,
  path TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  last_used_ms INTEGER NOT NULL
);
`;

let db: Database.Database | undefined;
let dbPath: string | undefined;

export function openState(): Database.Database {
  const file = path.join(forkdHome(), "forkd.db");
  if (db && dbPath === file) return db;
  db?.close();
  ensureStateDir();
  db = new Database(file);
  fs.chmodSync(file, 0o600);
  db.pragma("journal_mode = WAL");
  db.pragma("busy_timeout = 5000");
  db.pragma("synchronous = NORMAL");
  db.exec(SCHEMA);
  migrate(db);
  dbPath = file;
  return db;
}

/** Columns added after the first schema: added in place so older state files keep working. */
function migrate(database: Database.Database): void {
  const columns = new Set((database.prepare("PRAGMA table_info(sandboxes)").all() as { name: string }[]).map((c) => c.name));
  if (!columns.has("expires_at_ms")) database.exec("ALTER TABLE sandboxes ADD COLUMN expires_at_ms INTEGER");
  if (!columns.has("metadata")) database.exec("ALTER TABLE sandboxes ADD COLUMN metadata TEXT");
  if (!columns.has("network_policy")) database.exec("ALTER TABLE sandboxes ADD COLUMN network_policy TEXT");
  if (!columns.has("health")) database.exec("ALTER TABLE sandboxes ADD COLUMN health TEXT");
  if (!columns.has("health_reason")) database.exec("ALTER TABLE sandboxes ADD COLUMN health_reason TEXT");
  if (!columns.has("owner_pid")) database.exec("ALTER TABLE sandboxes ADD COLUMN owner_pid INTEGER");
  if (!columns.has("owner_start")) database.exec("ALTER TABLE sandboxes ADD COLUMN owner_start TEXT");
  if (!columns.has("vmm_uid")) database.exec("ALTER TABLE sandboxes ADD COLUMN vmm_uid INTEGER");
  const branchColumns = new Set((database.prepare("PRAGMA table_info(branches)").all() as { name: string }[]).map((c) => c.name));
  if (!branchColumns.has("owner_start")) database.exec("ALTER TABLE branches ADD COLUMN owner_start TEXT");
  if (!branchColumns.has("source_paused")) database.exec("ALTER TABLE branches ADD COLUMN source_paused INTEGER");
}

export const sandboxes = {
  insert(row: SandboxRow): void {
    openState()
      .prepare(
        `INSERT INTO sandboxes (id, tag, image, pid, pid_start, run_dir, state, created_at, accel, memory_mib, vcpus, network, network_policy, memory_limit_mib, cgroup, expires_at_ms, metadata, owner_pid, owner_start, vmm_uid)
         VALUES (@id, @tag, @image, @pid, @pid_start, @run_dir, @state, @created_at, @accel, @memory_mib, @vcpus, @network, @network_policy, @memory_limit_mib, @cgroup, @expires_at_ms, @metadata, @owner_pid, @owner_start, @vmm_uid)`,
      )
      .run({ network_policy: null, owner_pid: null, owner_start: null, vmm_uid: null, ...row });
  },
  /** The VMM of a "starting" row, recorded as soon as it is launched. */
  setVmm(id: string, pid: number, pidStart: string): void {
    openState().prepare("UPDATE sandboxes SET pid = ?, pid_start = ? WHERE id = ?").run(pid, pidStart, id);
  },
  setCgroup(id: string, cgroup: string | null): void {
    openState().prepare("UPDATE sandboxes SET cgroup = ? WHERE id = ?").run(cgroup, id);
  },
  /** The child answered: from now on it is a sandbox like any other, re-adopted after a restart. */
  confirm(id: string): void {
    openState().prepare("UPDATE sandboxes SET state = 'running' WHERE id = ? AND state = 'starting'").run(id);
  },
  get(id: string): SandboxRow | undefined {
    return openState().prepare("SELECT * FROM sandboxes WHERE id = ?").get(id) as SandboxRow | undefined;
  },
  list(): SandboxRow[] {
    return openState().prepare("SELECT * FROM sandboxes ORDER BY created_at, id").all() as SandboxRow[];
  },
  byTag(tag: string): SandboxRow[] {
    return openState().prepare("SELECT * FROM sandboxes WHERE tag = ?").all(tag) as SandboxRow[];
  },
  /** The first reason sticks: later violations of the same guest add nothing. */
  markUnhealthy(id: string, reason: string): void {
    openState()
      .prepare("UPDATE sandboxes SET health = 'unhealthy', health_reason = COALESCE(health_reason, ?) WHERE id = ?")
      .run(reason, id);
  },
  remove(id: string): void {
    openState().prepare("DELETE FROM sandboxes WHERE id = ?").run(id);
  },
  expired(nowMs: number): SandboxRow[] {
    // Only rows whose state the table lets expire (a child still starting is its starter's to finish or undo).
    return openState()
      .prepare(`SELECT * FROM sandboxes WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ? AND ${sandboxRowsAllowing("expire")}`)
      .all(nowMs) as SandboxRow[];
  },
};

export const staged = {
  upsert(row: StagedRow): void {
    openState()
      .prepare(
        `INSERT INTO staged (key, tag, path, bytes, last_used_ms) VALUES (@key, @tag, @path, @bytes, @last_used_ms)
         ON CONFLICT(key) DO UPDATE SET last_used_ms = excluded.last_used_ms, bytes = excluded.bytes, path = excluded.path`,
      )
      .run(row);
  },
  list(): StagedRow[] {
    return openState().prepare("SELECT * FROM staged ORDER BY last_used_ms").all() as StagedRow[];
  },
  remove(key: string): void {
    openState().prepare("DELETE FROM staged WHERE key = ?").run(key);
  },
};

export const branches = {
  /** Claim the tag for a BRANCH in progress; false when a row holds it in a state the table lets no new writer take over. */
  claim(row: BranchRow): boolean {
    const takeOver = claimableBranchStatuses()
      .map((s) => `'${s}'`)
      .join(", ");
    const res = openState()
      .prepare(
        `INSERT INTO branches (tag, source_id, mode, status, error, pause_ms, total_ms, owner_pid, created_at, owner_start, source_paused)
         VALUES (@tag, @source_id, @mode, @status, @error, @pause_ms, @total_ms, @owner_pid, @created_at, @owner_start, 0)
         ON CONFLICT(tag) DO UPDATE SET source_id = excluded.source_id, mode = excluded.mode, status = excluded.status,
           error = NULL, pause_ms = NULL, total_ms = NULL, owner_pid = excluded.owner_pid, created_at = excluded.created_at,
           owner_start = excluded.owner_start, source_paused = 0
         WHERE branches.status IN (${takeOver || "NULL"})`,
      )
      .run({ owner_start: null, ...row });
    return res.changes === 1;
  },
  get(tag: string): BranchRow | undefined {
    return openState().prepare("SELECT * FROM branches WHERE tag = ?").get(tag) as BranchRow | undefined;
  },
  list(): BranchRow[] {
    return openState().prepare("SELECT * FROM branches ORDER BY created_at").all() as BranchRow[];
  },
  finish(tag: string, fields: { status: "ready" | "failed"; error?: string; pause_ms?: number; total_ms?: number }): void {
    openState()
      .prepare(
        "UPDATE branches SET status = @status, error = @error, pause_ms = COALESCE(@pause_ms, pause_ms), total_ms = @total_ms WHERE tag = @tag",
      )
      .run({
        tag,
        status: fields.status,
        error: fields.error ?? null,
        pause_ms: fields.pause_ms ?? null,
        total_ms: fields.total_ms ?? null,
      });
  },
  /** Set before anything may pause the source, cleared once it runs again: what recovery needs to resume it. */
  setSourcePaused(tag: string, paused: boolean): void {
    openState()
      .prepare("UPDATE branches SET source_paused = ? WHERE tag = ?")
      .run(paused ? 1 : 0, tag);
  },
  setPause(tag: string, pauseMs: number): void {
    openState().prepare("UPDATE branches SET pause_ms = ? WHERE tag = ?").run(pauseMs, tag);
  },
  remove(tag: string): void {
    openState().prepare("DELETE FROM branches WHERE tag = ?").run(tag);
  },
};

export type WorkspaceRow = {
  name: string;
  id: string;
  source_tag: string;
  /** The snapshot it resumes from: its latest suspend, or null before the first. */
  state_tag: string | null;
  /** Every state snapshot it made and still holds, oldest first (JSON array): removed with it. */
  states: string;
  status: WorkspaceState;
  sandbox_id: string | null;
  memory_limit_mib: number | null;
  created_ms: number;
  last_active_ms: number;
};

export const workspaces = {
  /** False when the name is taken. */
  insert(row: WorkspaceRow): boolean {
    const res = openState()
      .prepare(
        `INSERT OR IGNORE INTO workspaces (name, id, source_tag, state_tag, states, status, sandbox_id, memory_limit_mib, created_ms, last_active_ms)
         VALUES (@name, @id, @source_tag, @state_tag, @states, @status, @sandbox_id, @memory_limit_mib, @created_ms, @last_active_ms)`,
      )
      .run(row);
    return res.changes === 1;
  },
  get(name: string): WorkspaceRow | undefined {
    return openState().prepare("SELECT * FROM workspaces WHERE name = ?").get(name) as WorkspaceRow | undefined;
  },
  list(): WorkspaceRow[] {
    return openState().prepare("SELECT * FROM workspaces ORDER BY name").all() as WorkspaceRow[];
  },
  update(name: string, fields: Partial<Omit<WorkspaceRow, "name" | "id" | "created_ms">>): void {
    const keys = Object.keys(fields);
    if (keys.length === 0) return;
    openState()
      .prepare(`UPDATE workspaces SET ${keys.map((k) => `${k} = @${k}`).join(", ")} WHERE name = @name`)
      .run({ ...fields, name });
  },
  remove(name: string): void {
    openState().prepare("DELETE FROM workspaces WHERE name = ?").run(name);
  },
};
