// Calls that act on a tag everywhere it is, in a cluster: removing a snapshot
// (rmi) and sizing its hot pool. The node a client called sends the call on to
// every live node that holds the tag (each serves it locally, as a single daemon
// would); a node holding the tag that has no lease now gets the removal recorded in
// etcd and applies it when it rejoins. A pool's target is split over the live,
// undrained nodes, each keeping its share; a node without the tag pulls it first.
import { type ClusterNode, type NodeRecord, ShareRefused } from "@forkd/cluster";
import { ForkdError, isForkdError } from "@forkd/core";
import { bringTagTo } from "./cluster-spread.js";

type Answer = { status: number; body: unknown };

function failure(node: string, what: string, res: Answer): ForkdError {
  const body = (res.body ?? {}) as { error?: string; code?: string; details?: Record<string, unknown> };
  return new ForkdError((body.code ?? "internal") as ForkdError["code"], `node ${node}: ${what}: ${body.error ?? `HTTP ${res.status}`}`, {
    node,
    ...(body.details ?? {}),
  });
}

const holds = (n: NodeRecord, tag: string) => n.snapshots.some((s) => s.tag === tag);

/**
 * Remove `tag` from every node of the cluster. `here` removes it on this node (the
 * route's own path; a 404 there is fine when other nodes hold it). Answers the nodes
 * it was removed from, and those that will remove it when they rejoin.
 */
export async function removeEverywhere(opts: {
  cluster: ClusterNode;
  tag: string;
  query: string;
  here: () => Promise<boolean>;
}): Promise<{ removed_on: string[]; deferred_on: string[] }> {
  const { cluster, tag } = opts;
  const nodes = await cluster.nodes();
  const others = nodes.filter((n) => n.name !== cluster.name && holds(n, tag));
  const creator = await cluster.tags.owner(tag);
  const removedOn: string[] = [];
  if (await opts.here()) removedOn.push(cluster.name);
  // One at a time: a refusal (dependents without cascade, a conflict) stops before the next node changes.
  for (const node of others) {
    const res = await cluster.call(node, "DELETE", `/v1/snapshots/${encodeURIComponent(tag)}${opts.query}`);
    if (res.status === 404) continue;
    if (res.status !== 204) throw failure(node.name, `removing ${tag}`, res);
    removedOn.push(node.name);
  }
  const deferredOn: string[] = [];
  if (creator && creator !== cluster.name && !nodes.some((n) => n.name === creator)) {
    await cluster.catalog.recordDelete(creator, "snapshot", tag);
    deferredOn.push(creator);
  }
  if (removedOn.length === 0 && deferredOn.length === 0) {
    throw new ForkdError("not_found", `no node of the cluster holds snapshot ${tag}`, { tag });
  }
  await cluster.tags.remove(tag);
  return { removed_on: removedOn, deferred_on: deferredOn };
}

/** `size` split over `nodes` (in name order): as even as whole children allow, the remainder to the first. */
function poolShares(size: number, nodes: readonly string[]): Map<string, number> {
  const sorted = [...nodes].sort();
  const shares = new Map<string, number>();
  for (const [i, name] of sorted.entries()) shares.set(name, Math.floor(size / sorted.length) + (i < size % sorted.length ? 1 : 0));
  return shares;
}

/**
 * Set the hot pool of `tag` to `size` children across the cluster: each live,
 * undrained node keeps its share (nodes that hold the tag first when the pool is
 * smaller than the cluster), draining nodes keep none. `here` sets this node's share.
 */
export async function setPoolEverywhere(opts: {
  cluster: ClusterNode;
  tag: string;
  size: number;
  here: (size: number) => Promise<unknown>;
}): Promise<{ shares: Record<string, number> }> {
  const { cluster, tag, size } = opts;
  if (!Number.isSafeInteger(size) || size < 0)
    throw new ForkdError("bad_request", `a pool size is a whole number ≥ 0, got ${size}`, { size });
  const nodes = await cluster.nodes();
  const ready = nodes.filter((n) => !n.draining);
  if (ready.length === 0) throw new ForkdError("cluster_unavailable", "no undrained node of the cluster holds a lease now", {});
  // A pool of fewer children than nodes goes to nodes that hold the tag: no pull for a child or two.
  const holders = ready.filter((n) => holds(n, tag));
  const takers = size < ready.length && holders.length > 0 ? holders.slice(0, size) : ready;
  const shares = poolShares(
    size,
    takers.map((n) => n.name),
  );
  for (const n of nodes) if (!shares.has(n.name)) shares.set(n.name, 0);
  for (const node of nodes) {
    const share = shares.get(node.name)!;
    if (node.name === cluster.name) {
      await opts.here(share);
      continue;
    }
    if (share > 0 && !holds(node, tag)) await bringTagTo(cluster, nodes, tag, node.name);
    if (share === 0 && !holds(node, tag)) continue;
    const res = await cluster.call(node, "PUT", `/v1/snapshots/${encodeURIComponent(tag)}/pool`, { size: share }).catch((err: unknown) => {
      if (isForkdError(err, "node_unreachable")) throw new ShareRefused(node.name, err.message);
      throw err;
    });
    if (res.status !== 200) throw failure(node.name, `setting the pool of ${tag} to ${share}`, res);
  }
  return { shares: Object.fromEntries(shares) };
}
