// A fork spread over nodes (packages/cluster/src/spread.ts), with the per-node calls
// played by a fake cluster: each node has room for so many children and starts or
// refuses its share whole, as a real node's admission does. Checked: every child or
// none across all nodes, a refused share moved (never back to the refuser, never
// placed twice), one pull per node that lacks the tag, and a failure anywhere
// killing what every other node started.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { Locality, NodeOffer } from "../../packages/cluster/src/placement.js";
import { ShareRefused, type SpreadChild, type SpreadPeers, spreadFork } from "../../packages/cluster/src/spread.js";

type FakeNode = {
  /** What the node really has room for when asked (its offer may have said more). */
  room: number;
  /** Refuse outright (unreachable). */
  down?: boolean;
  /** Fail a share with a hard error (a child that would not restore). */
  broken?: boolean;
};

function fakeCluster(nodes: Record<string, FakeNode>) {
  const running = new Map<string, string>(); // id -> node
  const pulls: string[] = [];
  const log: string[] = [];
  let next = 0;
  const peers: SpreadPeers = {
    prepare: async (node) => {
      pulls.push(node);
      return { downloadedBytes: 10, transferBytes: 100 };
    },
    fork: async (node, n) => {
      const fake = nodes[node]!;
      await new Promise((r) => setTimeout(r, Math.random() * 3));
      if (fake.down) throw new ShareRefused(node, "unreachable");
      const here = [...running.values()].filter((v) => v === node).length;
      if (here + n > fake.room) throw new ShareRefused(node, `room for ${fake.room - here}`);
      if (fake.broken) throw new Error(`a child on ${node} did not answer`);
      log.push(`${node}+${n}`);
      return Array.from({ length: n }, () => {
        const id = `sb-${next++}`;
        running.set(id, node);
        return { id, node } satisfies SpreadChild;
      });
    },
    kill: async (node, id) => {
      expect(running.get(id)).toBe(node);
      running.delete(id);
    },
  };
  return { peers, running, pulls, log };
}

const offer = (node: string, locality: Locality, fits: number): NodeOffer => ({ node, state: "ready", locality, fits });

describe("spreadFork", () => {
  it("spreads over nodes and pulls once on each node that lacks the tag", async () => {
    const c = fakeCluster({ a: { room: 10 }, b: { room: 10 }, c: { room: 10 } });
    const r = await spreadFork({
      n: 12,
      offers: [offer("a", "staged", 4), offer("b", "ancestor", 4), offer("c", "none", 10)],
      peers: c.peers,
    });
    expect(r.children).toHaveLength(12);
    expect(c.running.size).toBe(12);
    expect(Object.fromEntries(r.shares.map((s) => [s.node, s.n]))).toEqual({ a: 4, b: 4, c: 4 });
    expect(c.pulls.sort()).toEqual(["b", "c"]);
    expect([...r.prepared.keys()].sort()).toEqual(["b", "c"]);
  });

  it("moves a refused share to the next node", async () => {
    const c = fakeCluster({ a: { room: 2 }, b: { room: 10 }, c: { room: 10 } });
    const r = await spreadFork({
      n: 6,
      offers: [offer("a", "staged", 6), offer("b", "on_disk", 10), offer("c", "none", 10)],
      peers: c.peers,
    });
    expect(r.refused.map((x) => x.node)).toEqual(["a"]);
    expect(Object.fromEntries(r.shares.map((s) => [s.node, s.n]))).toEqual({ b: 6 });
    expect(c.running.size).toBe(6);
    expect([...c.running.values()].every((n) => n === "b")).toBe(true);
  });

  it("refused whole when the cluster is short, with nothing started anywhere", async () => {
    const c = fakeCluster({ a: { room: 3 }, b: { room: 1 } });
    await expect(spreadFork({ n: 5, offers: [offer("a", "staged", 3), offer("b", "staged", 1)], peers: c.peers })).rejects.toMatchObject({
      code: "over_limit",
      details: { available: 4, need: 5 },
    });
    expect(c.log).toEqual([]);
    // Short only once asked: b offered room it no longer has, a's share started and is killed again.
    const d = fakeCluster({ a: { room: 3 }, b: { room: 0 } });
    await expect(spreadFork({ n: 5, offers: [offer("a", "staged", 3), offer("b", "staged", 2)], peers: d.peers })).rejects.toMatchObject({
      code: "over_limit",
    });
    expect(d.running.size).toBe(0);
  });

  it("a hard failure on one node kills what the others started", async () => {
    const c = fakeCluster({ a: { room: 10 }, b: { room: 10, broken: true }, c: { room: 10 } });
    await expect(
      spreadFork({ n: 9, offers: [offer("a", "staged", 3), offer("b", "staged", 3), offer("c", "staged", 3)], peers: c.peers }),
    ).rejects.toThrow(/did not answer/);
    expect(c.running.size).toBe(0);
  });

  it("property: all or nothing across nodes, within each node's real room, never on a refuser", async () => {
    const names = ["a", "b", "c", "d"];
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 30 }),
        fc.array(
          fc.record({
            offered: fc.nat({ max: 12 }),
            room: fc.nat({ max: 12 }),
            down: fc.boolean(),
            broken: fc.constantFrom(false, false, false, true),
            locality: fc.constantFrom<Locality>("staged", "on_disk", "none"),
          }),
          { minLength: 4, maxLength: 4 },
        ),
        async (n, spec) => {
          const nodes = Object.fromEntries(names.map((name, i) => [name, spec[i]!]));
          const c = fakeCluster(nodes);
          const offers = names.map((name, i) => offer(name, spec[i]!.locality, spec[i]!.offered));
          let result: Awaited<ReturnType<typeof spreadFork>> | undefined;
          try {
            result = await spreadFork({ n, offers, peers: c.peers });
          } catch {
            expect(c.running.size).toBe(0);
            return;
          }
          expect(result.children).toHaveLength(n);
          expect(c.running.size).toBe(n);
          expect(new Set(result.children.map((x) => x.id)).size).toBe(n);
          for (const name of names) {
            const there = [...c.running.values()].filter((v) => v === name).length;
            expect(there).toBeLessThanOrEqual(nodes[name]!.room);
            expect(there).toBe(result.shares.find((s) => s.node === name)?.n ?? 0);
            if (nodes[name]!.down) expect(there).toBe(0);
          }
          expect(new Set(c.pulls).size).toBe(c.pulls.length);
        },
      ),
      { numRuns: 200 },
    );
  });
});
