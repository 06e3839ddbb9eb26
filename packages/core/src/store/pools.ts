// Hot pools in SQLite: the size wanted per snapshot tag (so it survives a restart)
// and the marker on each pooled child's sandbox row. A pooled child is an ordinary
// row (re-adopted, reaped and counted like any) whose `pool` names the tag it waits
// for; handing it out clears the marker in one statement, so two claims, even from
// two processes, can never get the same child.
import type Database from "better-sqlite3";
import { openState, type SandboxRow } from "./state.js";
import { sandboxRowsAllowing } from "./state-rules.js";

export type PoolSettingRow = { tag: string; size: number; updated_at: string };

const prepared = new WeakSet<Database.Database>();

/** The pool table and the row marker, added in place so older state files keep working. */
function db(): Database.Database {
  const database = openState();
  if (prepared.has(database)) return database;
  database.exec("CREATE TABLE IF NOT EXISTS pools (tag TEXT PRIMARY KEY, size INTEGER NOT NULL, updated_at TEXT NOT NULL)");
  const columns = new Set((database.prepare("PRAGMA table_info(sandboxes)").all() as { name: string }[]).map((c) => c.name));
  if (!columns.has("pool")) database.exec("ALTER TABLE sandboxes ADD COLUMN pool TEXT");
  database.exec("CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes(pool)");
  prepared.add(database);
  return database;
}

export const poolSettings = {
  get(tag: string): PoolSettingRow | undefined {
    return db().prepare("SELECT * FROM pools WHERE tag = ?").get(tag) as PoolSettingRow | undefined;
  },
  list(): PoolSettingRow[] {
    return db().prepare("SELECT * FROM pools ORDER BY tag").all() as PoolSettingRow[];
  },
  set(tag: string, size: number): void {
    db()
      .prepare(
        "INSERT INTO pools (tag, size, updated_at) VALUES (?, ?, ?) ON CONFLICT(tag) DO UPDATE SET size = excluded.size, updated_at = excluded.updated_at",
      )
      .run(tag, size, new Date().toISOString());
  },
  remove(tag: string): void {
    db().prepare("DELETE FROM pools WHERE tag = ?").run(tag);
  },
};

export const pooledRows = {
  /** Mark a child as waiting in `tag`'s pool (done while it is still starting, so it is never a user's). */
  mark(id: string, tag: string): void {
    db().prepare("UPDATE sandboxes SET pool = ? WHERE id = ?").run(tag, id);
  },
  /** Every row of a pool: those still starting and those ready. */
  of(tag: string): SandboxRow[] {
    return db().prepare("SELECT * FROM sandboxes WHERE pool = ? ORDER BY created_at, id").all(tag) as SandboxRow[];
  },
  all(): SandboxRow[] {
    return db().prepare("SELECT * FROM sandboxes WHERE pool IS NOT NULL ORDER BY created_at, id").all() as SandboxRow[];
  },
  /**
   * Take up to `n` children the state table lets a pool hand out (answered their identity, healthy) out of the
   * pool, oldest first, and set what the claimer asked for. Atomic: a child is
   * returned by exactly one claim.
   */
  claim(tag: string, n: number, fields: { expires_at_ms: number | null; metadata: string | null }): SandboxRow[] {
    if (n <= 0) return [];
    return db()
      .prepare(
        `UPDATE sandboxes SET pool = NULL, expires_at_ms = @expires_at_ms, metadata = @metadata
         WHERE id IN (SELECT id FROM sandboxes WHERE pool = @tag AND ${sandboxRowsAllowing("claim")} ORDER BY created_at, id LIMIT @n)
         RETURNING *`,
      )
      .all({ tag, n, ...fields }) as SandboxRow[];
  },
};
