// Cluster placement (packages/cluster/src/placement.ts) without VMs: examples for each
// rule, then properties over random clusters (fast-check): every child placed or none,
// no node over its room, nothing on a draining/unreachable/refused node, a worse
// locality used only once every better node is full, and a refused share moved
// without placing any child twice.
import { AdmissionLedger, defaultLimits, forkNeeds } from "@forkd/core";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  LOCALITIES,
  type Locality,
  localityOf,
  moveRefusedShare,
  type NodeOffer,
  type NodeState,
  type Placement,
  planPlacement,
  rankNodes,
  type Share,
} from "../../packages/cluster/src/placement.js";

const offer = (node: string, locality: Locality, fits: number, state: NodeState = "ready"): NodeOffer => ({ node, state, locality, fits });

function sharesOf(p: Placement): Share[] {
  if (!p.ok) throw new Error(`refused: ${JSON.stringify(p)}`);
  return p.shares;
}

const byNode = (shares: Share[]) => Object.fromEntries(shares.map((s) => [s.node, s.n]));

describe("placement examples", () => {
  it("ranks a hot pool over staged-with-children over staged over disk over ancestor over nothing", () => {
    const offers = [
      offer("none", "none", 9),
      offer("anc", "ancestor", 9),
      offer("disk", "on_disk", 9),
      offer("staged", "staged", 9),
      offer("live", "staged_live", 9),
      offer("pool", "hot_pool", 9),
    ];
    expect(rankNodes(offers).map((o) => o.node)).toEqual(["pool", "live", "staged", "disk", "anc", "none"]);
  });

  it("locality beats an empty node with more room", () => {
    expect(byNode(sharesOf(planPlacement(4, [offer("empty", "none", 100), offer("has", "staged", 5)])))).toEqual({ has: 4 });
  });

  it("fills the best node to its room, then moves down a tier", () => {
    expect(byNode(sharesOf(planPlacement(7, [offer("empty", "none", 100), offer("has", "staged", 5)])))).toEqual({ has: 5, empty: 2 });
  });

  it("spreads evenly over nodes of one tier, within each one's room", () => {
    expect(byNode(sharesOf(planPlacement(30, [offer("a", "staged", 50), offer("b", "staged", 50), offer("c", "staged", 50)])))).toEqual({
      a: 10,
      b: 10,
      c: 10,
    });
    expect(byNode(sharesOf(planPlacement(30, [offer("a", "staged", 50), offer("b", "staged", 4), offer("c", "staged", 50)])))).toEqual({
      a: 13,
      b: 4,
      c: 13,
    });
  });

  it("gives the odd child to the node that took the request", () => {
    expect(
      byNode(sharesOf(planPlacement(4, [offer("a", "staged", 9), offer("b", "staged", 9), offer("c", "staged", 9)], { local: "c" }))),
    ).toEqual({
      c: 2,
      a: 1,
      b: 1,
    });
  });

  it("skips draining and unreachable nodes and refuses whole when the rest is short", () => {
    const p = planPlacement(5, [offer("a", "hot_pool", 9, "draining"), offer("b", "staged", 9, "unreachable"), offer("c", "none", 4)]);
    expect(p).toEqual({
      ok: false,
      available: 4,
      skipped: [
        { node: "a", why: "draining" },
        { node: "b", why: "unreachable" },
      ],
    });
  });

  it("moves a refused share to the next node and never back to the refuser", () => {
    const offers = [offer("a", "staged", 3), offer("b", "staged", 3), offer("c", "none", 10)];
    const first = sharesOf(planPlacement(6, offers));
    expect(byNode(first)).toEqual({ a: 3, b: 3 });
    const moved = sharesOf(moveRefusedShare(first, "a", offers));
    expect(byNode(moved)).toEqual({ b: 3, c: 3 });
    const again = moveRefusedShare(moved, "c", offers, { exclude: new Set(["a"]) });
    expect(again.ok).toBe(false);
  });

  it("locality from what a node holds", () => {
    const h = { has: true, poolReady: 0, staged: false, liveChildren: 0, ancestorPresent: false };
    expect(localityOf({ ...h, poolReady: 2, staged: true })).toBe("hot_pool");
    expect(localityOf({ ...h, staged: true, liveChildren: 3 })).toBe("staged_live");
    expect(localityOf({ ...h, staged: true })).toBe("staged");
    expect(localityOf(h)).toBe("on_disk");
    expect(localityOf({ ...h, has: false, ancestorPresent: true })).toBe("ancestor");
    expect(localityOf({ ...h, has: false })).toBe("none");
  });

  it("refuses bad input", () => {
    expect(() => planPlacement(-1, [])).toThrow(RangeError);
    expect(() => planPlacement(1, [offer("a", "none", 1), offer("a", "none", 1)])).toThrow(/twice/);
    expect(() => planPlacement(1, [offer("a", "none", 1.5)])).toThrow(RangeError);
  });
});

const arbOffers = fc
  .uniqueArray(
    fc.record({
      node: fc.constantFrom("a", "b", "c", "d", "e", "f", "g"),
      state: fc.constantFrom<NodeState>("ready", "ready", "ready", "draining", "unreachable"),
      locality: fc.constantFrom(...LOCALITIES),
      fits: fc.nat({ max: 40 }),
    }),
    { selector: (o) => o.node, maxLength: 7 },
  )
  .map((offers) => offers as NodeOffer[]);

/** The invariants every accepted plan keeps; `room` is each node's fits less what was taken before. */
function checkPlan(n: number, offers: NodeOffer[], p: Placement, exclude: ReadonlySet<string> = new Set()) {
  const usable = offers.filter((o) => o.state === "ready" && !exclude.has(o.node));
  const capacity = usable.reduce((s, o) => s + o.fits, 0);
  if (capacity < n) {
    expect(p.ok).toBe(false);
    return;
  }
  const shares = sharesOf(p);
  expect(shares.reduce((s, x) => s + x.n, 0)).toBe(n);
  expect(new Set(shares.map((s) => s.node)).size).toBe(shares.length);
  for (const s of shares) {
    const o = usable.find((u) => u.node === s.node);
    expect(o, `share on unusable node ${s.node}`).toBeDefined();
    expect(s.n).toBeGreaterThan(0);
    expect(s.n).toBeLessThanOrEqual(o!.fits);
  }
  // A worse tier is used only when every better usable node is full.
  const worst = Math.max(-1, ...shares.map((s) => LOCALITIES.indexOf(s.locality)));
  for (const o of usable) {
    if (LOCALITIES.indexOf(o.locality) < worst) expect(byNode(shares)[o.node] ?? 0).toBe(o.fits);
  }
}

describe("placement properties", () => {
  it("all or nothing, within room, usable nodes only, best locality first", () => {
    fc.assert(
      fc.property(fc.nat({ max: 120 }), arbOffers, (n, offers) => {
        checkPlan(n, offers, planPlacement(n, offers));
      }),
      { numRuns: 500 },
    );
  });

  it("a chain of refusals never places a child twice nor on a refuser", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 120 }), arbOffers, fc.array(fc.nat({ max: 6 }), { maxLength: 4 }), (n, offers, picks) => {
        let p = planPlacement(n, offers);
        const refused = new Set<string>();
        for (const pick of picks) {
          if (!p.ok) break;
          const victim = p.shares[pick % p.shares.length]!.node;
          p = moveRefusedShare(p.shares, victim, offers, { exclude: refused });
          refused.add(victim);
          if (p.ok) {
            expect(p.shares.some((s) => refused.has(s.node))).toBe(false);
          }
        }
        if (p.ok) {
          expect(p.shares.reduce((s, x) => s + x.n, 0)).toBe(n);
          expect(new Set(p.shares.map((s) => s.node)).size).toBe(p.shares.length);
          for (const s of p.shares) expect(s.n).toBeLessThanOrEqual(offers.find((o) => o.node === s.node)!.fits);
        } else {
          const left = offers.filter((o) => o.state === "ready" && !refused.has(o.node)).reduce((s, o) => s + o.fits, 0);
          expect(left).toBeLessThan(n);
        }
        checkPlan(n, offers, planPlacement(n, offers, { exclude: refused }), refused);
      }),
      { numRuns: 500 },
    );
  });
});

describe("a node's room for a fork (core's AdmissionLedger.room, what a node offers)", () => {
  const MIB = 2 ** 20;
  const needs = (n: number) => forkNeeds({ n, guestMemoryBytes: 128 * MIB, unstagedBytes: 0, dirtyFraction: 0.25 });
  const capacity = (memAvailableMib: number, sandboxesAlive = 0) => ({
    memAvailableBytes: memAvailableMib * MIB,
    memTotalBytes: 16384 * MIB,
    shmFreeBytes: 8192 * MIB,
    shmEvictableBytes: 0,
    sandboxesAlive,
  });

  it("is the largest count admit accepts, beside what is reserved", () => {
    fc.assert(
      fc.property(fc.integer({ min: 300, max: 8000 }), fc.nat({ max: 20 }), fc.nat({ max: 30 }), (mem, alive, held) => {
        const ledger = new AdmissionLedger(defaultLimits({ memTotalBytes: 16384 * MIB, maxSandboxes: 40, memoryHeadroomBytes: 256 * MIB }));
        const cap = capacity(mem, alive);
        const before = ledger.admit(needs(held), cap);
        const room = ledger.room(needs, cap, 40 - alive);
        const fits = ledger.admit(needs(room), cap);
        expect(fits.ok).toBe(true);
        if (fits.ok) fits.ticket.release();
        expect(ledger.admit(needs(room + 1), cap).ok).toBe(false);
        if (before.ok) before.ticket.release();
      }),
      { numRuns: 200 },
    );
  });
});
