// A fork of N children spread over the cluster's nodes, all or nothing, as one
// promise whoever asked can rely on: every child started somewhere, or an error and
// no child left anywhere. The plan is placement.ts's; this module runs it. Each
// node's share is forked there all or nothing by that node's own admission
// (core's forkAllOrNothing behind its POST /v1/sandboxes), so a share either starts
// whole or not at all. A node that refuses its share (503: its admission says no
// now, or it cannot be reached) has the share moved to the next nodes and is asked
// for nothing more in this request; any other failure kills every child already
// started on every node and is passed on. The I/O (pull, fork, kill on a node) is
// the caller's, behind `SpreadPeers`, so the policy is tested without VMs.
import { ForkdError } from "@forkd/core";
import { type Locality, moveRefusedShare, type NodeOffer, type Placement, planPlacement, type Share } from "./placement.js";

/** A child some node started, as that node's API described it, with the node's name. */
export type SpreadChild = { id: string; node: string } & Record<string, unknown>;

/** What bringing the tag to a node moved (a pull through the registry). */
export type Prepared = {
  /** Bytes that crossed the network to this node. */
  downloadedBytes: number;
  /** What the registry holds for the whole chain: what a pull of everything would move. */
  transferBytes: number;
};

/** The per-node operations a spread needs; the daemon implements them with node-to-node calls. */
export type SpreadPeers = {
  /** Make the tag restorable on `node`, whose locality says what it lacks (a pull: the layers above what it has). */
  prepare: (node: string, locality: Locality) => Promise<Prepared>;
  /** Fork `n` children of the tag on `node`, all or nothing there. Throw `ShareRefused` for a 503 or an unreachable node. */
  fork: (node: string, n: number) => Promise<SpreadChild[]>;
  /** Kill one child on its node (rollback). */
  kill: (node: string, id: string) => Promise<void>;
};

/** A node said no to its share without starting any of it: the share may go elsewhere. */
export class ShareRefused extends Error {
  constructor(
    readonly node: string,
    readonly reason: string,
  ) {
    super(`node ${node} refused its share: ${reason}`);
    this.name = "ShareRefused";
  }
}

/** Localities whose node must fetch something before it can restore the tag. */
const NEEDS_PULL: ReadonlySet<Locality> = new Set(["ancestor", "none"]);

export type SpreadResult = {
  children: SpreadChild[];
  /** Where the children went (after any moves). */
  shares: Share[];
  /** Nodes that refused their share, in order, with why. */
  refused: { node: string; reason: string }[];
  /** What each node that had to fetch the tag moved. */
  prepared: Map<string, Prepared>;
};

/** The 503 a spread leaves with when the cluster has no room for all of it. */
function clusterShortError(n: number, placement: Extract<Placement, { ok: false }>, refused: readonly { node: string }[]): ForkdError {
  return new ForkdError(
    "over_limit",
    `the cluster has room for ${placement.available} of the ${n} children asked for${refused.length ? ` after ${refused.map((r) => r.node).join(", ")} refused` : ""}; none were started: retry later, add nodes or fork fewer`,
    { resource: "sandboxes", retry_after_s: 5, need: n, available: placement.available, skipped: placement.skipped, refused },
  );
}

/**
 * Fork `n` children over the nodes in `offers`, all or nothing. `local` is the
 * node that took the request (it goes first among equals).
 */
export async function spreadFork(opts: {
  n: number;
  offers: readonly NodeOffer[];
  peers: SpreadPeers;
  local?: string;
}): Promise<SpreadResult> {
  const { n, offers, peers } = opts;
  const local = opts.local !== undefined ? { local: opts.local } : {};
  const first = planPlacement(n, offers, local);
  if (!first.ok) throw clusterShortError(n, first, []);
  let shares = first.shares;
  const done = new Map<string, number>();
  const started: SpreadChild[] = [];
  const refused: { node: string; reason: string }[] = [];
  const prepared = new Map<string, Prepared>();
  const preparing = new Map<string, Promise<Prepared>>();
  const localityOf = new Map(offers.map((o) => [o.node, o.locality]));

  const runShare = async (node: string, count: number): Promise<void> => {
    const locality = localityOf.get(node) ?? "none";
    if (NEEDS_PULL.has(locality)) {
      // One pull per node per request, however many shares it ends up with.
      let p = preparing.get(node);
      if (!p) {
        p = peers.prepare(node, locality);
        preparing.set(node, p);
      }
      prepared.set(node, await p);
    }
    const children = await peers.fork(node, count);
    if (children.length !== count) {
      started.push(...children);
      throw new ForkdError("internal", `node ${node} started ${children.length} children for a share of ${count}`);
    }
    started.push(...children);
    done.set(node, (done.get(node) ?? 0) + count);
  };

  try {
    for (;;) {
      const pending = shares.map((s) => ({ node: s.node, n: s.n - (done.get(s.node) ?? 0) })).filter((s) => s.n > 0);
      if (pending.length === 0) break;
      const results = await Promise.allSettled(pending.map((s) => runShare(s.node, s.n)));
      const hard = results.find((r): r is PromiseRejectedResult => r.status === "rejected" && !(r.reason instanceof ShareRefused));
      if (hard) throw hard.reason;
      const refusals = results.flatMap((r) => (r.status === "rejected" ? [r.reason as ShareRefused] : []));
      for (const refusal of refusals) {
        const exclude = new Set(refused.map((r) => r.node));
        refused.push({ node: refusal.node, reason: refusal.reason });
        // What the refuser already started in earlier rounds stays; only its unstarted part moves.
        const startedThere = done.get(refusal.node) ?? 0;
        const withoutRefuser = shares.map((s) => (s.node === refusal.node ? { ...s, n: s.n - startedThere } : s));
        const moved = moveRefusedShare(withoutRefuser, refusal.node, offers, { exclude, ...local });
        if (!moved.ok) throw clusterShortError(n, moved, refused);
        shares =
          startedThere > 0
            ? [...moved.shares, { node: refusal.node, n: startedThere, locality: localityOf.get(refusal.node)! }]
            : moved.shares;
      }
    }
  } catch (err) {
    const rollback = await killEverywhere(started, peers);
    if (err instanceof ForkdError) {
      throw rollback.length ? new ForkdError(err.code, err.message, { ...(err.details ?? {}), rollback_failures: rollback }) : err;
    }
    throw err;
  }
  return { children: started, shares: shares.filter((s) => s.n > 0), refused, prepared };
}

/** Kill every started child on its node; one that will not die does not stop the others. */
async function killEverywhere(
  children: readonly SpreadChild[],
  peers: SpreadPeers,
): Promise<{ node: string; id: string; message: string }[]> {
  const failures: { node: string; id: string; message: string }[] = [];
  await Promise.all(
    children.map(async (c) => {
      try {
        await peers.kill(c.node, c.id);
      } catch (err) {
        failures.push({ node: c.node, id: c.id, message: (err as Error).message });
      }
    }),
  );
  return failures;
}
