// Membership: each daemon holds an etcd lease and keeps its node record under it
// (nodes/NODE). The record says where the node answers and what it can take; when
// the lease lapses (the daemon died, stopped, or lost etcd for longer than the TTL)
// etcd removes the record, and the other nodes stop sending it work and answer its
// sandboxes' calls with 503 `node_unreachable`. A node that lost its lease refuses
// new work until it has rejoined: a new lease, its record, and what it runs
// re-published from its own SQLite (the caller's `onJoined`).
import { randomUUID } from "node:crypto";
import { ForkdError, isForkdError } from "@forkd/core";
import type { Lease } from "etcd3";
import { type EtcdStore, keys, lastPart } from "./etcd.js";

const NODE_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** A node name as a key part: no '/', no '..', nothing etcd or a URL path would read differently. */
export function validateNodeName(value: unknown): string {
  if (typeof value !== "string" || !NODE_NAME_RE.test(value) || value.includes("..")) {
    throw new ForkdError(
      "bad_request",
      `invalid node name '${String(value).slice(0, 80)}': use 1-63 letters, digits, '-', '_' and '.', starting with a letter or digit`,
    );
  }
  return value;
}

/** An advertise URL: http(s)://HOST[:PORT] and nothing else (no credentials, path, query or fragment). */
export function validateAdvertiseUrl(value: unknown): string {
  let url: URL | undefined;
  try {
    url = typeof value === "string" ? new URL(value) : undefined;
  } catch {
    url = undefined;
  }
  if (
    !url ||
    (url.protocol !== "http:" && url.protocol !== "https:") ||
    url.username ||
    url.password ||
    (url.pathname !== "/" && url.pathname !== "") ||
    url.search ||
    url.hash ||
    !url.hostname
  ) {
    throw new ForkdError(
      "bad_request",
      `the advertise URL must be http(s)://HOST[:PORT] with nothing after it, got '${String(value).slice(0, 200)}'`,
    );
  }
  return url.origin;
}

/** Where a snapshot is on a node, best first for placement. */
export type SnapshotPresence = "pool_ready" | "staged" | "on_disk";

type NodeCapacity = {
  max_sandboxes: number;
  sandboxes: number;
  max_branches: number;
  branches: number;
  /** Host memory admission could still hand out (MemAvailable − headroom − what is reserved). */
  memory_free_bytes: number;
  /** Free bytes on the staging filesystem. */
  shm_free_bytes: number;
};

/** What a node says about itself, refreshed every heartbeat. */
export type NodeStatus = {
  capacity: NodeCapacity;
  /** 1-minute load average of the host. */
  load: number;
  /** Tags this node holds, with how ready each is. */
  snapshots: { tag: string; presence: SnapshotPresence }[];
};

/** The record under nodes/NODE. */
export type NodeRecord = NodeStatus & {
  name: string;
  url: string;
  /** One per daemon process: a second daemon with the same name is told apart. */
  instance: string;
  version: string;
  joined_at: string;
  updated_at: string;
  /** From drain/NODE, folded in when nodes are listed. */
  draining: boolean;
};

export type MembershipState = "joining" | "joined" | "lost" | "closed";

export type MembershipOpts = {
  etcd: EtcdStore;
  name: string;
  url: string;
  version: string;
  leaseTtlS: number;
  /** What this node reports each heartbeat. */
  status: () => Promise<NodeStatus>;
  /** Called after each (re)join, before the node counts as joined: re-publish, apply deletes made while away. */
  onJoined: () => Promise<void>;
  /** Called each heartbeat while joined (catch the catalog up with what changed locally). */
  onHeartbeat?: () => Promise<void>;
  log: (line: string) => void;
};

/** Parse a stored node record; a record that does not parse (another version, tampering) is skipped, not trusted. */
function parseNodeRecord(key: string, raw: string): Omit<NodeRecord, "draining"> | undefined {
  try {
    const rec = JSON.parse(raw) as Omit<NodeRecord, "draining">;
    if (rec.name !== lastPart(key)) return undefined;
    validateNodeName(rec.name);
    rec.url = validateAdvertiseUrl(rec.url);
    if (!rec.capacity || !Array.isArray(rec.snapshots)) return undefined;
    return rec;
  } catch {
    return undefined;
  }
}

/** The live nodes (a record exists only while its lease does), with their drain flags. */
export async function listNodes(etcd: EtcdStore): Promise<NodeRecord[]> {
  const [records, drains] = await Promise.all([etcd.getPrefix(keys.nodes), etcd.getPrefix(keys.drains)]);
  const drained = new Set(Object.keys(drains).map(lastPart));
  const nodes: NodeRecord[] = [];
  for (const [key, raw] of Object.entries(records)) {
    const rec = parseNodeRecord(key, raw);
    if (rec) nodes.push({ ...rec, draining: drained.has(rec.name) });
  }
  return nodes.sort((a, b) => a.name.localeCompare(b.name));
}

const HEARTBEAT_MIN_MS = 500;

export class Membership {
  private lease: Lease | undefined;
  private stateNow: MembershipState = "joining";
  private readonly instance = randomUUID();
  private joinedAt = new Date().toISOString();
  private timer: NodeJS.Timeout | undefined;
  private joining: Promise<void> | undefined;
  private lastError = "";
  /** When etcd last renewed the lease: past the TTL without one, etcd has let it go (or will), whatever the client thinks. */
  private lastRenewal = 0;
  /** Did the last heartbeat reach etcd? New work waits while it does not (the lease may lapse any moment). */
  private etcdAnswers = true;

  constructor(private readonly opts: MembershipOpts) {}

  get state(): MembershipState {
    return this.stateNow;
  }

  /** Why the node is not joined (empty when it is). */
  get reason(): string {
    return this.stateNow === "joined" ? "" : this.lastError || `node ${this.opts.name} is ${this.stateNow}`;
  }

  /** Join once now (throws if etcd refuses or the name is taken); afterwards the node rejoins by itself. */
  async start(): Promise<void> {
    // A daemon killed just now may still hold the name until its lease lapses: wait that long, not longer.
    const deadline = Date.now() + (this.opts.leaseTtlS + 2) * 1000;
    for (;;) {
      try {
        await this.joinOnce();
        break;
      } catch (err) {
        if (isForkdError(err, "conflict") && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 500));
          continue;
        }
        if (!isForkdError(err, "cluster_unavailable")) throw err;
        // etcd not there yet: serve what runs here, refuse new work, and keep trying to join.
        this.lastError = err.message;
        this.opts.log(`forkd cluster: not joined yet (${err.message}); retrying`);
        break;
      }
    }
    this.schedule();
  }

  private schedule(): void {
    if (this.stateNow === "closed") return;
    const everyMs = Math.max(HEARTBEAT_MIN_MS, (this.opts.leaseTtlS * 1000) / 4);
    this.timer = setTimeout(() => {
      this.tick()
        .catch((err: Error) => {
          this.lastError = err.message;
        })
        .finally(() => this.schedule());
    }, everyMs);
    this.timer.unref();
  }

  private async tick(): Promise<void> {
    const lease = this.lease;
    if (this.stateNow === "joined" && lease && Date.now() - this.lastRenewal > this.opts.leaseTtlS * 1000) {
      // The client would wait 2 TTLs before calling it lost (etcd3's keepalive); etcd drops it after one. A stopped
      // process (SIGSTOP) wakes here too: its lease is gone, so it rejoins now rather than serve as a ghost.
      lease.release();
      this.onLost(lease, new Error(`no renewal for ${Math.round((Date.now() - this.lastRenewal) / 1000)} s`));
    }
    if (this.stateNow === "joined") {
      try {
        await this.putRecord();
        this.etcdAnswers = true;
      } catch (err) {
        this.etcdAnswers = false;
        throw err;
      }
      await this.opts.onHeartbeat?.();
    } else if (this.stateNow === "lost" || this.stateNow === "joining") {
      await this.joinOnce();
    }
  }

  /** One attempt to hold a lease and the node's record; then the caller's re-publish; then joined. */
  private async joinOnce(): Promise<void> {
    this.joining ??= (async () => {
      const { etcd, name, leaseTtlS } = this.opts;
      const lease = await etcd.grantLease(leaseTtlS);
      this.lastRenewal = Date.now();
      lease.on("lost", (err) => this.onLost(lease, err));
      lease.on("keepaliveSucceeded", () => {
        if (lease === this.lease) this.lastRenewal = Date.now();
      });
      const record = JSON.stringify(await this.record());
      // The name is this node's only while no live lease holds its record: a second daemon with the same name is refused.
      const created = await etcd.client
        .if(keys.node(name), "Create", "==", 0)
        .then(lease.put(keys.node(name)).value(record))
        .commit()
        .catch((err: Error) => {
          lease.release();
          throw new ForkdError("cluster_unavailable", `etcd did not answer (join as ${name}): ${err.message}`);
        });
      if (!created.succeeded) {
        await lease.revoke().catch(() => lease.release());
        const holder = await etcd.get(keys.node(name));
        let instance = "";
        try {
          instance = (JSON.parse(holder ?? "{}") as { instance?: string }).instance ?? "";
        } catch {
          // an unreadable record is someone else's too
        }
        // This process's own record under a lease it gave up (etcd was away, or it was stopped): remove it and join afresh.
        if (instance === this.instance && holder !== null && (await etcd.deleteIfValue(keys.node(name), holder))) {
          throw new ForkdError("cluster_unavailable", `node ${name} removed its stale record; joining again`);
        }
        throw new ForkdError(
          "conflict",
          `another daemon holds the node name '${name}' in the cluster (instance ${instance.slice(0, 8) || "unknown"}); pick another --node-name, or wait ${leaseTtlS} s for its lease to lapse`,
        );
      }
      this.lease = lease;
      this.joinedAt = new Date().toISOString();
      try {
        await this.opts.onJoined();
      } catch (err) {
        // Not joined until what it runs is published: drop the lease and try again next beat.
        this.lease = undefined;
        await lease.revoke().catch(() => lease.release());
        throw err;
      }
      if (this.stateNow !== "closed") {
        this.stateNow = "joined";
        this.etcdAnswers = true;
        this.lastRenewal = Date.now();
        this.lastError = "";
        this.opts.log(`forkd cluster: node ${name} joined (lease ${leaseTtlS} s)`);
      }
    })().finally(() => {
      this.joining = undefined;
    });
    return this.joining;
  }

  private onLost(lease: Lease, err: Error): void {
    if (lease !== this.lease || this.stateNow === "closed") return;
    this.lease = undefined;
    this.stateNow = "lost";
    this.lastError = `node ${this.opts.name} lost its cluster lease (${err.message}); it refuses new work until it rejoins`;
    this.opts.log(`forkd cluster: ${this.lastError}`);
  }

  private async record(): Promise<Omit<NodeRecord, "draining">> {
    const status = await this.opts.status();
    return {
      name: this.opts.name,
      url: this.opts.url,
      instance: this.instance,
      version: this.opts.version,
      joined_at: this.joinedAt,
      updated_at: new Date().toISOString(),
      ...status,
    };
  }

  /** Refresh the record (capacity, load, snapshots held) under the current lease. */
  async putRecord(): Promise<void> {
    const lease = this.lease;
    if (!lease || this.stateNow !== "joined") return;
    const record = JSON.stringify(await this.record());
    try {
      await lease.put(keys.node(this.opts.name)).value(record);
    } catch (err) {
      throw new ForkdError("cluster_unavailable", `etcd did not answer (heartbeat): ${(err as Error).message}`);
    }
  }

  /** Throws `cluster_unavailable` unless the node holds its lease: new work waits for a rejoin. */
  assertJoined(what: string): void {
    if (this.stateNow === "joined" && this.etcdAnswers) return;
    if (this.stateNow === "joined") {
      throw new ForkdError("cluster_unavailable", `${what} refused: etcd does not answer node ${this.opts.name} (${this.lastError})`, {
        node: this.opts.name,
        state: "etcd_unreachable",
      });
    }
    throw new ForkdError("cluster_unavailable", `${what} refused: ${this.reason || `node ${this.opts.name} has not joined the cluster`}`, {
      node: this.opts.name,
      state: this.stateNow,
    });
  }

  /** Leave: revoke the lease so the others see this node gone at once (not after the TTL). */
  async close(): Promise<void> {
    this.stateNow = "closed";
    if (this.timer) clearTimeout(this.timer);
    await this.joining?.catch(() => {});
    const lease = this.lease;
    this.lease = undefined;
    if (lease) await lease.revoke({ deadline: Date.now() + this.opts.etcd.timeoutMs }).catch(() => lease.release());
  }
}
