// Sandbox state shared by every forkd process on the host: one SQLite file in
// WAL mode, so concurrent CLI invocations (and later the daemon) see the same
// sandboxes. Snapshots are not here: their manifests on disk are the registry.
import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import { forkdHome } from "./config.js";

export type SandboxRow = {
  id: string;
  tag: string | null;
  image: string;
  pid: number;
  pid_start: string;
  run_dir: string;
  state: "running" | "paused" | "stopped";
  created_at: string;
  accel: string;
  memory_mib: number;
  vcpus: number;
  network: string;
  memory_limit_mib: number | null;
  cgroup: string | null;
  /** Killed by the daemon's reaper (or `forkd cleanup`) after this time; null: no time limit. */
  expires_at_ms: number | null;
  /** User-supplied string pairs, JSON-encoded. */
  metadata: string | null;
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
  fs.mkdirSync(forkdHome(), { recursive: true, mode: 0o700 });
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
}

export const sandboxes = {
  insert(row: SandboxRow): void {
    openState()
      .prepare(
        `INSERT INTO sandboxes (id, tag, image, pid, pid_start, run_dir, state, created_at, accel, memory_mib, vcpus, network, memory_limit_mib, cgroup, expires_at_ms, metadata)
         VALUES (@id, @tag, @image, @pid, @pid_start, @run_dir, @state, @created_at, @accel, @memory_mib, @vcpus, @network, @memory_limit_mib, @cgroup, @expires_at_ms, @metadata)`,
      )
      .run(row);
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
  setState(id: string, state: SandboxRow["state"]): void {
    openState().prepare("UPDATE sandboxes SET state = ? WHERE id = ?").run(state, id);
  },
  remove(id: string): void {
    openState().prepare("DELETE FROM sandboxes WHERE id = ?").run(id);
  },
  expired(nowMs: number): SandboxRow[] {
    return openState().prepare("SELECT * FROM sandboxes WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?").all(nowMs) as SandboxRow[];
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
