// The daemon's side of a cluster (packages/cluster): what it reports about its host
// each heartbeat, what it re-publishes from its SQLite when it (re)joins, and how it
// applies a delete that was asked for elsewhere while it was away.
import os from "node:os";
import { type ClusterConfig, type ClusterHost, ClusterNode, type NodeStatus, type SnapshotPresence } from "@forkd/cluster";
import { killSandbox, listSandboxes, listSnapshots, readCapacity, removeSnapshot, staged } from "@forkd/core";
import type { ServerContext } from "./routes/context.js";

/** Capacity, load and the snapshots this host holds (best presence per tag), for its node record. */
async function nodeStatus(ctx: ServerContext): Promise<NodeStatus> {
  const capacity = readCapacity();
  const limits = ctx.admission.limits;
  const reserved = ctx.admission.reserved();
  const presence = new Map<string, SnapshotPresence>();
  for (const snap of await listSnapshots()) presence.set(snap.tag, "on_disk");
  for (const row of staged.list()) if (presence.has(row.tag)) presence.set(row.tag, "staged");
  for (const pool of ctx.hotPools.list()) if (pool.ready > 0 && presence.has(pool.tag)) presence.set(pool.tag, "pool_ready");
  return {
    capacity: {
      max_sandboxes: limits.maxSandboxes,
      sandboxes: capacity.sandboxesAlive + reserved.sandboxes,
      max_branches: limits.maxBranches,
      branches: reserved.branches,
      memory_free_bytes: Math.max(0, capacity.memAvailableBytes - limits.memoryHeadroomBytes - reserved.memoryBytes),
      shm_free_bytes: Math.max(0, capacity.shmFreeBytes + capacity.shmEvictableBytes - reserved.shmBytes),
    },
    load: Math.round(os.loadavg()[0]! * 100) / 100,
    snapshots: [...presence].map(([tag, p]) => ({ tag, presence: p })).sort((a, b) => a.tag.localeCompare(b.tag)),
  };
}

export function startCluster(ctx: ServerContext, config: ClusterConfig, log: (line: string) => void): Promise<ClusterNode> {
  const host: ClusterHost = {
    status: () => nodeStatus(ctx),
    localSandboxes: () => listSandboxes().map((s) => s.id),
    localTags: async () => (await listSnapshots()).map((s) => s.tag),
    applyDelete: async (d) => {
      if (d.kind === "sandbox") {
        ctx.agents.drop(d.key);
        await killSandbox(d.key);
        log(`forkd cluster: killed ${d.key}, as node ${d.requested_by || "?"} was asked while this node was away`);
      } else {
        await removeSnapshot(d.key);
        log(`forkd cluster: removed snapshot ${d.key}, as node ${d.requested_by || "?"} was asked while this node was away`);
      }
    },
    log,
  };
  return ClusterNode.start(config, host);
}
