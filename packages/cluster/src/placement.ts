// Where the children of one fork go, as pure planning: no I/O, so every rule is a
// unit test. Each node says what it holds of the tag (its locality) and how many
// children its own admission control says fit now; the plan fills the nodes that
// hold most of the tag first, and is all or nothing: it places every child or none.
// A node that refuses its share when asked (a 503 from its admission: something
// changed since it offered) has that share moved to the next nodes, and is never
// given anything again in the same request, so no child is placed twice.

/**
 * What a node holds of a tag, best first. A child restored where its memory image
 * is already on shmem starts without staging; a pull that finds an ancestor moves
 * only the layers above it; a node with nothing must pull the whole chain.
 */
export const LOCALITIES = [
  /** A ready hot pool of the tag: its children are handed out, not restored. */
  "hot_pool",
  /** Staged, with live children mapping it: staged and known to restore here. */
  "staged_live",
  /** The memory image is on the node's shmem. */
  "staged",
  /** The snapshot is on the node's disk: staging copies it to shmem first. */
  "on_disk",
  /** Only an ancestor is here: a pull fetches the layers above it, not the base. */
  "ancestor",
  /** Nothing of it: a pull fetches the whole chain. */
  "none",
] as const;
export type Locality = (typeof LOCALITIES)[number];

/** A node as placement sees it; only `ready` nodes take work. */
export type NodeState = "ready" | "draining" | "unreachable";

/** One node's offer for a fork of a given tag. */
export type NodeOffer = {
  node: string;
  state: NodeState;
  locality: Locality;
  /** Children of this tag the node's admission control says fit beside its work in flight. */
  fits: number;
};

/** So many children on one node. */
export type Share = { node: string; n: number; locality: Locality };

export type Placement =
  | { ok: true; shares: Share[] }
  | {
      ok: false;
      /** Children the usable nodes could take between them (less than asked). */
      available: number;
      /** Nodes skipped and why (draining, unreachable, refused earlier, full). */
      skipped: { node: string; why: string }[];
    };

export type PlanOpts = {
  /** Nodes that refused earlier in this request: they get nothing more. */
  exclude?: ReadonlySet<string>;
  /** Children already placed in this request, by node: counted against each node's `fits`. */
  taken?: ReadonlyMap<string, number>;
  /** The node that took the request: among equals it goes first (its share needs no forward). */
  local?: string;
};

function rankOf(locality: Locality): number {
  return LOCALITIES.indexOf(locality);
}

function checkCount(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${what} must be a whole number ≥ 0, got ${n}`);
}

/**
 * The usable offers, best locality first. Ties: the node that took the request,
 * then more room, then the name (so one input always gives one plan).
 */
export function rankNodes(offers: readonly NodeOffer[], opts: PlanOpts = {}): NodeOffer[] {
  return offers
    .filter((o) => o.state === "ready" && !opts.exclude?.has(o.node))
    .slice()
    .sort(
      (a, b) =>
        rankOf(a.locality) - rankOf(b.locality) ||
        Number(b.node === opts.local) - Number(a.node === opts.local) ||
        b.fits - a.fits ||
        (a.node < b.node ? -1 : a.node > b.node ? 1 : 0),
    );
}

/**
 * Place `n` children. Nodes are taken a locality tier at a time, best tier
 * first; within a tier, nodes hold the same bytes of the tag, so the children are
 * spread over them as evenly as their room allows (their restores run on
 * different hosts at once). A worse tier is used only once every better node is
 * full. If all usable nodes together hold fewer than `n`, nothing is placed.
 */
export function planPlacement(n: number, offers: readonly NodeOffer[], opts: PlanOpts = {}): Placement {
  checkCount(n, "the number of children");
  const seen = new Set<string>();
  for (const o of offers) {
    if (seen.has(o.node)) throw new RangeError(`node ${o.node} offered twice`);
    seen.add(o.node);
    checkCount(o.fits, `node ${o.node}'s fits`);
  }
  const skipped: { node: string; why: string }[] = [];
  for (const o of offers) {
    if (opts.exclude?.has(o.node)) skipped.push({ node: o.node, why: "refused its share earlier in this request" });
    else if (o.state !== "ready") skipped.push({ node: o.node, why: o.state });
  }
  const ranked = rankNodes(offers, opts).map((o) => ({ ...o, room: Math.max(0, o.fits - (opts.taken?.get(o.node) ?? 0)) }));
  for (const o of ranked) if (o.room === 0) skipped.push({ node: o.node, why: "full" });
  const usable = ranked.filter((o) => o.room > 0);
  const available = usable.reduce((sum, o) => sum + o.room, 0);
  if (available < n) return { ok: false, available, skipped };

  const counts = new Map<string, number>();
  let left = n;
  for (let i = 0; i < usable.length && left > 0; ) {
    let end = i;
    while (end < usable.length && usable[end]!.locality === usable[i]!.locality) end++;
    left = spreadEvenly(usable.slice(i, end), left, counts);
    i = end;
  }
  const shares = usable
    .filter((o) => (counts.get(o.node) ?? 0) > 0)
    .map((o) => ({ node: o.node, n: counts.get(o.node)!, locality: o.locality }));
  return { ok: true, shares };
}

/**
 * Water-filling over one tier (nodes in rank order): each round gives every node
 * with room the same number, the smallest room left bounding it; the remainder
 * below one per node goes to the first in rank. Returns what did not fit.
 */
function spreadEvenly(tier: readonly { node: string; room: number }[], n: number, counts: Map<string, number>): number {
  let left = n;
  let open = tier.map((o) => ({ node: o.node, room: o.room }));
  while (left > 0 && open.length > 0) {
    const each = Math.min(Math.floor(left / open.length), ...open.map((o) => o.room));
    if (each === 0) {
      for (const o of open.slice(0, left)) {
        counts.set(o.node, (counts.get(o.node) ?? 0) + 1);
        o.room--;
      }
      left = 0;
      break;
    }
    for (const o of open) {
      counts.set(o.node, (counts.get(o.node) ?? 0) + each);
      o.room -= each;
      left -= each;
    }
    open = open.filter((o) => o.room > 0);
  }
  return left;
}

/**
 * A node refused its share (its admission said 503, or it could not be reached):
 * move that share to the other nodes. Shares already placed stay where they are
 * and count against their nodes' room; the refusing node and every node refused
 * before (`exclude`) get nothing. The result is the whole plan again, or a
 * refusal if the others cannot take the share (the caller then undoes it all).
 */
export function moveRefusedShare(
  shares: readonly Share[],
  refused: string,
  offers: readonly NodeOffer[],
  opts: { exclude?: ReadonlySet<string>; local?: string } = {},
): Placement {
  const share = shares.find((s) => s.node === refused);
  if (!share) throw new RangeError(`node ${refused} holds no share of this plan`);
  const kept = shares.filter((s) => s.node !== refused);
  const taken = new Map(kept.map((s) => [s.node, s.n]));
  const exclude = new Set([...(opts.exclude ?? []), refused]);
  const moved = planPlacement(share.n, offers, { exclude, taken, ...(opts.local !== undefined ? { local: opts.local } : {}) });
  if (!moved.ok) return moved;
  const merged = new Map(kept.map((s) => [s.node, { ...s }]));
  for (const s of moved.shares) {
    const have = merged.get(s.node);
    if (have) have.n += s.n;
    else merged.set(s.node, { ...s });
  }
  return { ok: true, shares: [...merged.values()] };
}

/** What a node holds of a tag, as it reads its own store. */
export type Holdings = {
  /** The tag's snapshot is on this node's disk. */
  has: boolean;
  /** Children of the tag's hot pool ready to hand out here. */
  poolReady: number;
  /** Its memory image is staged (on shmem). */
  staged: boolean;
  /** Children of the tag alive here. */
  liveChildren: number;
  /** One of the tag's ancestors is here (a pull would fetch only the layers above it). */
  ancestorPresent: boolean;
};

export function localityOf(h: Holdings): Locality {
  if (h.has) {
    if (h.poolReady > 0) return "hot_pool";
    if (h.staged && h.liveChildren > 0) return "staged_live";
    if (h.staged) return "staged";
    return "on_disk";
  }
  return h.ancestorPresent ? "ancestor" : "none";
}
