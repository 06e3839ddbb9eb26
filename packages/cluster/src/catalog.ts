// The sandbox→node catalog (catalog/ID = NODE) and the deletes asked for while a
// node was away (deletes/NODE/KIND/KEY). A node's SQLite is the truth about what it
// runs: the catalog is published from it (each change, each heartbeat, in full on
// every join), and every entry can be rebuilt from the hosts. Entries are not on the
// node's lease: a node whose lease lapsed still owns its sandboxes, and calls for them
// answer 503 `node_unreachable` rather than 404.
import { ForkdError, validateSandboxId } from "@forkd/core";
import { type EtcdStore, keys, lastPart, type PendingDeleteKind } from "./etcd.js";

/** What a node must do to bring etcd's view of it in line with its own: pure, so unit tests decide it. */
export function catalogDiff(
  self: string,
  local: Iterable<string>,
  published: ReadonlyMap<string, string>,
): { put: string[]; remove: string[]; foreign: string[] } {
  const localSet = new Set(local);
  const put: string[] = [];
  const foreign: string[] = [];
  for (const id of localSet) {
    const owner = published.get(id);
    if (owner === undefined) put.push(id);
    else if (owner !== self) foreign.push(id);
  }
  const remove = [...published].filter(([id, owner]) => owner === self && !localSet.has(id)).map(([id]) => id);
  return { put: put.sort(), remove: remove.sort(), foreign: foreign.sort() };
}

export type PendingDelete = { node: string; kind: PendingDeleteKind; key: string; requested_by: string; at: string };

export class Catalog {
  /** What this node last published (id → owner), so a heartbeat writes only what changed. */
  private mine = new Set<string>();
  private syncing: Promise<void> | undefined;

  constructor(
    private readonly etcd: EtcdStore,
    private readonly self: string,
    private readonly log: (line: string) => void,
  ) {}

  /** The node that runs `id`, or undefined when the catalog has none. */
  async owner(id: string): Promise<string | undefined> {
    validateSandboxId(id);
    return (await this.etcd.get(keys.sandbox(id))) ?? undefined;
  }

  /**
   * Rebuild this node's part of the catalog from `local` (its SQLite): every entry
   * of its own that it no longer runs goes, every sandbox it runs is put. Called on
   * each (re)join.
   */
  async republish(local: string[]): Promise<{ put: number; removed: number }> {
    const all = await this.etcd.getPrefix(keys.catalog);
    const published = new Map(Object.entries(all).map(([k, v]) => [lastPart(k), v]));
    const diff = catalogDiff(this.self, local, published);
    for (const id of diff.foreign) {
      // An id is random and a node's own: two owners means a record from a node that was wiped. Ours is the truth here.
      this.log(`forkd cluster: sandbox ${id} was catalogued on ${published.get(id)}; this node runs it, re-publishing`);
    }
    await Promise.all([...diff.put, ...diff.foreign].map((id) => this.etcd.put(keys.sandbox(id), this.self)));
    await Promise.all(diff.remove.map((id) => this.etcd.deleteIfValue(keys.sandbox(id), this.self)));
    this.mine = new Set(local);
    return { put: diff.put.length + diff.foreign.length, removed: diff.remove.length };
  }

  /** Publish what changed since the last call (a fork, a kill, an expiry): cheap, so it runs before a fork's answer leaves. */
  sync(local: string[]): Promise<void> {
    const run = async () => {
      const now = new Set(local);
      const added = local.filter((id) => !this.mine.has(id));
      const gone = [...this.mine].filter((id) => !now.has(id));
      await Promise.all(added.map((id) => this.etcd.put(keys.sandbox(id), this.self)));
      await Promise.all(gone.map((id) => this.etcd.deleteIfValue(keys.sandbox(id), this.self)));
      for (const id of added) this.mine.add(id);
      for (const id of gone) this.mine.delete(id);
    };
    // One sync at a time: two interleaved would each see the other's additions as new.
    const next = (this.syncing ?? Promise.resolve()).catch(() => {}).then(run);
    this.syncing = next.finally(() => {
      if (this.syncing === next) this.syncing = undefined;
    });
    return next;
  }

  /** Remove a sandbox's entry on behalf of its owner (a kill recorded while the owner was away). */
  async forget(id: string, owner: string): Promise<void> {
    await this.etcd.deleteIfValue(keys.sandbox(id), owner);
  }

  /** Record a delete of `key` on `node` to apply when it rejoins. */
  async recordDelete(node: string, kind: PendingDeleteKind, key: string): Promise<void> {
    if (kind === "sandbox") validateSandboxId(key);
    const entry: PendingDelete = { node, kind, key, requested_by: this.self, at: new Date().toISOString() };
    await this.etcd.put(keys.pendingDelete(node, kind, key), JSON.stringify(entry));
  }

  /** The deletes waiting for `node` (only well-formed ones: a key is an id or a tag, never a path). */
  async pendingDeletes(node: string): Promise<PendingDelete[]> {
    const entries = await this.etcd.getPrefix(keys.pendingDeletes(node));
    const out: PendingDelete[] = [];
    for (const [key, raw] of Object.entries(entries)) {
      const rest = key.slice(keys.pendingDeletes(node).length).split("/");
      const kind = rest[0];
      if (rest.length !== 2 || (kind !== "sandbox" && kind !== "snapshot")) continue;
      let parsed: Partial<PendingDelete> = {};
      try {
        parsed = JSON.parse(raw) as Partial<PendingDelete>;
      } catch {
        // the key alone says what to delete
      }
      out.push({ node, kind, key: rest[1]!, requested_by: parsed.requested_by ?? "", at: parsed.at ?? "" });
    }
    return out;
  }

  /** Apply each delete waiting for this node with `apply`, then drop its record (a failed one stays for the next join). */
  async applyPendingDeletes(apply: (d: PendingDelete) => Promise<void>): Promise<number> {
    let applied = 0;
    for (const d of await this.pendingDeletes(this.self)) {
      try {
        await apply(d);
      } catch (err) {
        // A sandbox or snapshot already gone is what the delete wanted.
        if (!(err instanceof ForkdError && /not_found$/.test(err.code))) {
          this.log(`forkd cluster: could not apply the ${d.kind} delete of ${d.key}: ${(err as Error).message}`);
          continue;
        }
      }
      await this.etcd.delete(keys.pendingDelete(this.self, d.kind, d.key));
      applied++;
    }
    return applied;
  }
}
