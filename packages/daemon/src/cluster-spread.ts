// Forks that spread over the cluster, the daemon's side: the node that took a
// `POST /v1/sandboxes` plans where the children go (@forkd/cluster placement.ts,
// from the records nodes publish in etcd) and runs the plan (spread.ts) with the
// per-node calls below: its own share through the local fork path, the others'
// as node-to-node calls that each node serves locally, all or nothing there. A node
// without the tag pulls it through the cluster's OCI registry first (a pull
// fetches only the layers that node lacks); the tag is pushed there once, by a node
// that holds it. A live fork of a running sandbox to more children than its node
// holds is the same, after the owner captured it: only the capture's layer is
// pushed, and the nodes that hold the base pull that layer alone.
import {
  type ClusterNode,
  type Locality,
  localityOf,
  type NodeOffer,
  type NodeRecord,
  type Prepared,
  ShareRefused,
  type SpreadChild,
  type SpreadPeers,
  spreadFork,
} from "@forkd/cluster";
import { ForkdError, forkRoom, getSnapshot, isForkdError, listSandboxes, physicalBytes, pushSnapshot } from "@forkd/core";
import type { ServerContext } from "./routes/context.js";

/** How long a pull through the registry may take on a node before the spread gives up on it. */
const PULL_DEADLINE_MS = 10 * 60_000;
/** How long a node may take to start its share (restores under load; its own admission bounds the count). */
const FORK_CALL_TIMEOUT_MS = 10 * 60_000;
/** Deepest chain of ancestors followed when sizing a tag another node holds. */
const MAX_CHAIN = 64;

type ApiError = { error?: string; code?: string; details?: Record<string, unknown> };
type JobView = {
  id: string;
  status: "running" | "succeeded" | "failed";
  result: Record<string, unknown> | null;
  error: { code: string; message: string } | null;
};

/** REGISTRY/REPO:TAG of the cluster's registry (oci://HOST/REPO). */
function registryRefFor(cluster: ClusterNode, tag: string): string {
  const registry = cluster.config.registry;
  if (!registry) {
    throw new ForkdError(
      "bad_request",
      `this fork needs snapshot ${tag} on a node that does not hold it, and the cluster has no registry to move it through: start the daemons with --registry oci://HOST/REPO`,
      { tag },
    );
  }
  return `${registry.slice("oci://".length)}:${tag}`;
}

/** A node's error answer as a ForkdError with the node named. */
function errorFrom(node: string, what: string, res: { status: number; body: unknown }): ForkdError {
  const body = (res.body ?? {}) as ApiError;
  const code = (typeof body.code === "string" ? body.code : "internal") as ForkdError["code"];
  const message = typeof body.error === "string" ? body.error : `HTTP ${res.status}`;
  return new ForkdError(code, `node ${node}: ${what}: ${message}`, { node, ...(body.details ?? {}) });
}

/** The calls a spread makes on other nodes; a node that cannot be reached refuses its share (it moves on). */
function remoteCaller(cluster: ClusterNode, nodes: readonly NodeRecord[]) {
  const byName = new Map(nodes.map((n) => [n.name, n]));
  return async <T>(node: string, method: string, path: string, body?: unknown, timeoutMs?: number) => {
    const record = byName.get(node);
    if (!record) throw new ShareRefused(node, "not a live node of the cluster");
    try {
      return await cluster.call<T>(record, method, path, body, timeoutMs);
    } catch (err) {
      // Not reached at all: nothing started there, the share may go elsewhere. A call that timed out
      // may still be running there, so it is a failure of the whole fork (rolled back), not a refusal.
      if (isForkdError(err, "node_unreachable") && !/no answer within/.test(err.message)) throw new ShareRefused(node, err.message);
      throw err;
    }
  };
}

type Caller = ReturnType<typeof remoteCaller>;

/** Wait for a job (push, pull) on `node` to finish; its result, or its error as a ForkdError. */
async function waitForJob(call: Caller, node: string, id: string): Promise<Record<string, unknown>> {
  const deadline = Date.now() + PULL_DEADLINE_MS;
  for (let delay = 50; ; delay = Math.min(delay * 2, 1000)) {
    const res = await call<JobView>(node, "GET", `/v1/jobs/${encodeURIComponent(id)}`);
    if (res.status !== 200) throw errorFrom(node, `job ${id}`, res);
    const job = res.body;
    if (job.status === "succeeded") return job.result ?? {};
    if (job.status === "failed") {
      throw new ForkdError(
        (job.error?.code ?? "internal") as ForkdError["code"],
        `node ${node}: job ${id}: ${job.error?.message ?? "failed"}`,
        {
          node,
        },
      );
    }
    if (Date.now() > deadline)
      throw new ForkdError("internal", `node ${node}: job ${id} did not finish within ${PULL_DEADLINE_MS / 1000} s`, { node });
    await new Promise((r) => setTimeout(r, delay));
  }
}

/** A tag's guest memory and its chain of ancestors (a diff layer's parent first), and a node that holds it. */
type TagSizing = { memoryMib: number; ancestors: string[]; holder: string };

/** Size a tag from this node's store, or from a node that holds it. */
async function sizeTag(cluster: ClusterNode, call: Caller, nodes: readonly NodeRecord[], tag: string): Promise<TagSizing> {
  const local = await getSnapshot(tag).catch(() => undefined);
  if (local) {
    const ancestors: string[] = [];
    let parent = local.layer ? (local.parent ?? undefined) : undefined;
    while (parent && ancestors.length < MAX_CHAIN) {
      ancestors.push(parent);
      const up = await getSnapshot(parent).catch(() => undefined);
      parent = up?.layer ? (up.parent ?? undefined) : undefined;
    }
    return { memoryMib: local.memoryMib, ancestors, holder: cluster.name };
  }
  const holder = nodes.find((n) => n.snapshots.some((s) => s.tag === tag));
  if (!holder) throw new ForkdError("not_found", `no node of the cluster holds snapshot ${tag}`, { tag });
  type SnapshotView = { memory_mib?: number; parent?: string | null; storage?: string };
  const get = async (t: string) => {
    const res = await call<SnapshotView>(holder.name, "GET", `/v1/snapshots/${encodeURIComponent(t)}`);
    if (res.status !== 200) throw errorFrom(holder.name, `snapshot ${t}`, res);
    return res.body;
  };
  const head = await get(tag);
  if (typeof head.memory_mib !== "number")
    throw new ForkdError("invalid_state", `snapshot ${tag} on node ${holder.name} is not ready`, { tag });
  const ancestors: string[] = [];
  let view = head;
  while (view.storage === "diff" && typeof view.parent === "string" && ancestors.length < MAX_CHAIN) {
    ancestors.push(view.parent);
    view = await get(view.parent);
  }
  return { memoryMib: head.memory_mib, ancestors, holder: holder.name };
}

/** What an offer query asks a node: the tag, what it costs, and its ancestors. */
export type OfferQuery = { tag: string; memoryMib: number; memoryLimitMib?: number | undefined; ancestors: readonly string[] };

/**
 * This node's offer for a fork of the query's tag: its locality (from its own
 * store, hot pools and live children) and how many children its admission would
 * let in now beside the work in flight, plus its pool's ready children.
 */
export async function localOffer(ctx: ServerContext, q: OfferQuery): Promise<{ locality: Locality; fits: number }> {
  const snapshot = await getSnapshot(q.tag).catch(() => undefined);
  let ancestorPresent = false;
  for (const a of q.ancestors) {
    if (
      await getSnapshot(a).then(
        () => true,
        () => false,
      )
    ) {
      ancestorPresent = true;
      break;
    }
  }
  const poolReady = snapshot ? ctx.hotPools.get(q.tag).ready : 0;
  const locality = localityOf({
    has: snapshot !== undefined,
    poolReady,
    staged: snapshot?.staged ?? false,
    liveChildren: snapshot ? listSandboxes().filter((x) => x.alive && x.tag === q.tag && !x.pool).length : 0,
    ancestorPresent,
  });
  const room = await forkRoom(ctx.admission, { tag: q.tag, memoryLimitMib: q.memoryLimitMib, absent: { memoryMib: q.memoryMib } });
  return { locality, fits: room + poolReady };
}

/** Every live node's offer, asked now (a record in etcd is a heartbeat old); a node that does not answer is unreachable. */
async function liveOffers(
  ctx: ServerContext,
  cluster: ClusterNode,
  call: Caller,
  nodes: readonly NodeRecord[],
  q: OfferQuery,
): Promise<NodeOffer[]> {
  const params = new URLSearchParams({ tag: q.tag, memory_mib: String(q.memoryMib), ancestors: q.ancestors.join(",") });
  if (q.memoryLimitMib !== undefined) params.set("memory_limit_mib", String(q.memoryLimitMib));
  return Promise.all(
    nodes.map(async (node): Promise<NodeOffer> => {
      const state = node.draining ? "draining" : "ready";
      try {
        if (node.name === cluster.name) return { node: node.name, state, ...(await localOffer(ctx, q)) };
        const res = await call<{ locality: Locality; fits: number }>(node.name, "GET", `/v1/cluster/offer?${params}`);
        if (res.status !== 200) return { node: node.name, state: "unreachable", locality: "none", fits: 0 };
        return { node: node.name, state, locality: res.body.locality, fits: res.body.fits };
      } catch {
        return { node: node.name, state: "unreachable", locality: "none", fits: 0 };
      }
    }),
  );
}

/** Push `tag` to the cluster's registry from a node that holds it (this one if it does); the bytes uploaded. */
async function pushFromHolder(cluster: ClusterNode, call: Caller, holder: string, tag: string): Promise<number> {
  const ref = registryRefFor(cluster, tag);
  if (holder === cluster.name) return (await pushSnapshot(tag, ref)).uploaded_bytes;
  const res = await call<{ id: string }>(holder, "POST", `/v1/snapshots/${encodeURIComponent(tag)}/push`, { ref });
  if (res.status !== 202) throw errorFrom(holder, `pushing ${tag}`, res);
  return Number((await waitForJob(call, holder, res.body.id)).uploaded_bytes ?? 0);
}

/** Pull `tag` onto `node` through the registry; what the pull moved. */
async function pullOnto(cluster: ClusterNode, call: Caller, node: string, tag: string): Promise<Prepared> {
  const res = await call<{ id: string }>(node, "POST", "/v1/snapshots/pull", { ref: registryRefFor(cluster, tag) });
  if (res.status !== 202) throw errorFrom(node, `pulling ${tag}`, res);
  const result = await waitForJob(call, node, res.body.id);
  return { downloadedBytes: Number(result.downloaded_bytes ?? 0), transferBytes: Number(result.transfer_bytes ?? 0) };
}

/** Make `tag` present on `node`: pushed by a node that holds it, pulled there (only the layers it lacks). */
export async function bringTagTo(cluster: ClusterNode, nodes: readonly NodeRecord[], tag: string, node: string): Promise<Prepared> {
  const call = remoteCaller(cluster, nodes);
  const sizing = await sizeTag(cluster, call, nodes, tag);
  await pushFromHolder(cluster, call, sizing.holder, tag);
  return pullOnto(cluster, call, node, tag);
}

/** What a spread fork reports besides its children. */
export type SpreadReport = {
  shares: { node: string; n: number; locality: string }[];
  refused: { node: string; reason: string }[];
  pulled: { node: string; downloaded_bytes: number; transfer_bytes: number }[];
  pushed_bytes: number;
};

/**
 * Fork `n` children of `tag` over the cluster, all or nothing. `forkHere` is the
 * local fork path (pool claim, admission, restore) for this node's share; `killHere`
 * kills one of this node's children on rollback; `body` is the request, sent to the
 * other nodes with their share's count.
 */
export async function clusterFork(opts: {
  ctx: ServerContext;
  cluster: ClusterNode;
  tag: string;
  n: number;
  memoryLimitMib: number | undefined;
  body: Record<string, unknown>;
  forkHere: (n: number) => Promise<SpreadChild[]>;
  killHere: (id: string) => Promise<void>;
  /** A layer just pushed by this node (a live spread): the registry already has it. */
  pushed?: boolean;
  /** On failure, remove the tag again from the nodes that pulled it for this request (a live spread's capture). */
  dropPulledOnFailure?: boolean;
}): Promise<{ children: SpreadChild[]; report: SpreadReport }> {
  const { cluster, tag } = opts;
  const nodes = await cluster.nodes();
  const call = remoteCaller(cluster, nodes);
  const sizing = await sizeTag(cluster, call, nodes, tag);
  // Asked after this node's own share started (a live spread): its offer already counts those children.
  const offers = await liveOffers(opts.ctx, cluster, call, nodes, {
    tag,
    memoryMib: sizing.memoryMib,
    memoryLimitMib: opts.memoryLimitMib,
    ancestors: sizing.ancestors,
  });
  let pushedBytes = 0;
  let push: Promise<void> | undefined = opts.pushed ? Promise.resolve() : undefined;
  const ensurePushed = () => {
    push ??= (async () => {
      pushedBytes += await pushFromHolder(cluster, call, sizing.holder, tag);
    })();
    return push;
  };
  const pulledOn = new Set<string>();
  const peers: SpreadPeers = {
    prepare: async (node): Promise<Prepared> => {
      await ensurePushed();
      pulledOn.add(node);
      return pullOnto(cluster, call, node, tag);
    },
    fork: async (node, n) => {
      if (node === cluster.name) {
        try {
          return await opts.forkHere(n);
        } catch (err) {
          if (isForkdError(err, "over_limit")) throw new ShareRefused(node, err.message);
          throw err;
        }
      }
      const res = await call<SpreadChild[] | ApiError>(
        node,
        "POST",
        "/v1/sandboxes",
        { ...opts.body, snapshot_tag: tag, n },
        FORK_CALL_TIMEOUT_MS,
      );
      if (res.status === 503) throw new ShareRefused(node, (res.body as ApiError)?.error ?? "503");
      if (res.status !== 201 || !Array.isArray(res.body)) throw errorFrom(node, `forking ${n} of ${tag}`, res);
      return res.body.map((c) => ({ ...c, node }));
    },
    kill: async (node, id) => {
      if (node === cluster.name) return opts.killHere(id);
      const res = await call(node, "DELETE", `/v1/sandboxes/${encodeURIComponent(id)}`);
      if (res.status !== 204 && res.status !== 404) throw errorFrom(node, `killing ${id}`, res);
    },
  };
  let result: Awaited<ReturnType<typeof spreadFork>>;
  try {
    result = await spreadFork({ n: opts.n, offers, peers, local: cluster.name });
  } catch (err) {
    if (opts.dropPulledOnFailure) {
      await Promise.all(
        [...pulledOn].map((node) => call(node, "DELETE", `/v1/snapshots/${encodeURIComponent(tag)}`).catch(() => undefined)),
      );
    }
    throw err;
  }
  return {
    children: result.children,
    report: {
      shares: result.shares.map((s) => ({ node: s.node, n: s.n, locality: s.locality })),
      refused: result.refused,
      pulled: [...result.prepared].map(([node, p]) => ({ node, downloaded_bytes: p.downloadedBytes, transfer_bytes: p.transferBytes })),
      pushed_bytes: pushedBytes,
    },
  };
}

/** What a live fork spread over the cluster reports besides its children. */
export type LiveSpreadReport = SpreadReport & {
  /** Children the source's node started from the capture itself. */
  owner_n: number;
  /** The capture's own files on disk: its written pages, their page map and the device state. */
  layer_bytes: number;
  /** What the registry holds for the whole chain (base and layer): a node with nothing pulls this much. */
  full_pack_bytes: number;
};

/**
 * Children of the live fork the source's node takes: what its admission lets in
 * now for children of the source's snapshot (staged there: the source maps it); at
 * least one must fit, since the capture is forked where the source runs.
 */
export async function liveForkShare(ctx: ServerContext, node: string, sourceTag: string, n: number): Promise<number> {
  const room = await forkRoom(ctx.admission, { tag: sourceTag });
  if (room < 1) {
    throw new ForkdError(
      "over_limit",
      `node ${node}, where the source runs, has no room for one more child; a live fork starts at least one there`,
      { resource: "sandboxes", retry_after_s: 5, need: 1, available: 0 },
    );
  }
  return Math.min(n, room);
}

/**
 * The rest of a live fork, once the source's node captured it, started its own
 * share and registered the capture as snapshot `tag` (a diff layer on the source's
 * snapshot): push that snapshot (the registry has the base, so only the layer goes
 * up), then spread the other children over the nodes, each of which pulls the layer
 * once. On failure every child started for it anywhere is killed (the owner's too,
 * through `killHere`) and the layer is removed from the nodes that pulled it.
 */
export async function spreadLiveFork(opts: {
  ctx: ServerContext;
  cluster: ClusterNode;
  tag: string;
  rest: number;
  ownerN: number;
  body: Record<string, unknown>;
  forkHere: (n: number) => Promise<SpreadChild[]>;
  killHere: (id: string) => Promise<void>;
}): Promise<{ children: SpreadChild[]; report: LiveSpreadReport }> {
  const { cluster, tag } = opts;
  const info = await getSnapshot(tag);
  const pushed = await pushSnapshot(tag, registryRefFor(cluster, tag));
  const { children, report } = await clusterFork({
    ctx: opts.ctx,
    cluster,
    tag,
    n: opts.rest,
    memoryLimitMib: undefined,
    body: opts.body,
    forkHere: opts.forkHere,
    killHere: opts.killHere,
    pushed: true,
    dropPulledOnFailure: true,
  });
  return {
    children,
    report: {
      ...report,
      shares: [{ node: cluster.name, n: opts.ownerN, locality: "staged" }, ...report.shares],
      pushed_bytes: pushed.uploaded_bytes,
      owner_n: opts.ownerN,
      layer_bytes: physicalBytes(info),
      full_pack_bytes: pushed.blob_bytes,
    },
  };
}
