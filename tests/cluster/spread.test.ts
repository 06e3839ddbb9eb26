// Forks spread over a cluster of three daemons (separate processes on 127.0.0.1-3,
// each with its own home, run dir and staging dir), with a real etcd and the real
// docker-registry on loopback, 128 MiB guests. Each node admits at most a few
// sandboxes (--max-sandboxes), so a fork larger than one node must spread:
// - a fork from a tag one node holds spreads by room, the others pulling the tag
//   through the registry; one the cluster cannot hold is refused whole, with no
//   child left on any node;
// - a live fork of a running sandbox to more children than its node holds: the
//   owner pushes only the capture's layer (the registry has the base) and the other
//   nodes, which hold the base, pull the layer alone (bytes asserted) and restore
//   their share; every child sees the source's state.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ClusterDaemon, clusterTokenFile, type Service, startClusterDaemon, startEtcd, startRegistry } from "./spread-fixture.js";

const BASE = "spread-base";
/** Per node: the source plus a few children; small enough that 128 MiB guests on 2 cores stay quick. */
const MAX_SANDBOXES = 3;

type Child = { id: string; node?: string };
type ApiError = { error: string; code: string; details?: Record<string, unknown> };

let etcd: Service;
let registry: Service & { port: number };
const nodes: ClusterDaemon[] = [];
const node = (name: string) => nodes.find((n) => n.name === name)!;

async function sandboxesOn(d: ClusterDaemon): Promise<Child[]> {
  // Forwarded-by header: this node's own list, not the merged one.
  const res = await fetch(`${d.url}/v1/sandboxes`, { headers: { authorization: `Bearer ${d.token}` } });
  const all = (await res.json()) as Child[];
  return all.filter((c) => c.node === undefined || c.node === d.name);
}

async function killAll(children: readonly Child[]): Promise<void> {
  for (const c of children) {
    const res = await node("a").call("DELETE", `/v1/sandboxes/${c.id}`);
    expect([204, 404]).toContain(res.status);
  }
}

beforeAll(async () => {
  etcd = await startEtcd();
  registry = await startRegistry();
  const token = clusterTokenFile();
  for (const [index, name] of ["a", "b", "c"].entries()) {
    nodes.push(
      await startClusterDaemon({
        name,
        index,
        etcd: etcd.url,
        registry: registry.url,
        clusterTokenFile: token,
        args: ["--max-sandboxes", String(MAX_SANDBOXES)],
      }),
    );
  }
  const created = await node("a").call("POST", "/v1/snapshots", { tag: BASE, memory_mib: 128 });
  expect(created.status, JSON.stringify(created.body)).toBe(201);
}, 300_000);

afterAll(async () => {
  for (const d of nodes) await d.stop().catch(() => {});
  await registry?.stop();
  await etcd?.stop();
});

describe("a fork spread over the cluster", () => {
  it("spreads by room, the nodes without the tag pulling it, and refuses whole what the cluster cannot hold", async () => {
    const res = await node("a").call<Child[] | ApiError>("POST", "/v1/sandboxes", { snapshot_tag: BASE, n: 7 });
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const children = res.body as Child[];
    expect(children).toHaveLength(7);
    const perNode = Object.fromEntries(["a", "b", "c"].map((n) => [n, children.filter((c) => c.node === n).length]));
    // a holds the tag (staged): filled first to its room; b and c pulled it and share the rest.
    expect(perNode).toEqual({ a: 3, b: 2, c: 2 });
    for (const d of nodes)
      expect((await sandboxesOn(d)).map((c) => c.id).sort()).toEqual(
        children
          .filter((c) => c.node === d.name)
          .map((c) => c.id)
          .sort(),
      );
    // Any node answers for any child.
    for (const c of children.slice(0, 3))
      expect((await node("b").call("POST", `/v1/sandboxes/${c.id}/exec`, { cmd: "echo hi" })).status).toBe(200);
    await killAll(children);

    // 10 > 3 × 3: refused whole, nothing started anywhere.
    const refused = await node("b").call<ApiError>("POST", "/v1/sandboxes", { snapshot_tag: BASE, n: 10 });
    expect(refused.status).toBe(503);
    expect(refused.body.code).toBe("over_limit");
    expect(refused.body.error).toMatch(/room for 9 of the 10/);
    for (const d of nodes) expect(await sandboxesOn(d)).toEqual([]);
  }, 300_000);

  it("a live fork of a running sandbox spreads over three nodes, moving only the capture's layer", async () => {
    const [source] = (await node("a").call<Child[]>("POST", "/v1/sandboxes", { snapshot_tag: BASE, n: 1 })).body;
    // 4 MiB the source wrote itself: the layer, not the base, carries it.
    const wrote = await node("a").call<{ exit_code: number }>("POST", `/v1/sandboxes/${source!.id}/exec`, {
      cmd: "dd if=/dev/urandom of=/root/state bs=1M count=4 2>/dev/null; md5sum /root/state > /root/state.md5",
    });
    expect(wrote.body.exit_code).toBe(0);
    // Called on c: forwarded to a, the source's node, which captures and spreads.
    const res = await node("c").call<{
      tag: string;
      sandboxes: Child[];
      spread?: {
        shares: { node: string; n: number }[];
        pulled: { node: string; downloaded_bytes: number; transfer_bytes: number }[];
        pushed_bytes: number;
        layer_bytes: number;
        full_pack_bytes: number;
      };
    }>("POST", `/v1/sandboxes/${source!.id}/fork`, { n: 8 });
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const { sandboxes, spread } = res.body;
    expect(sandboxes).toHaveLength(8);
    expect(spread).toBeDefined();
    // a runs the source: room for 2 more; b and c take 3 each.
    expect(Object.fromEntries(spread!.shares.map((s) => [s.node, s.n]))).toEqual({ a: 2, b: 3, c: 3 });
    // Only the layer went up: the registry had the base since the first test's pulls.
    expect(spread!.pushed_bytes).toBeGreaterThan(0);
    expect(spread!.pushed_bytes).toBeLessThanOrEqual(1.2 * spread!.layer_bytes);
    // b and c held the base: each pulled the layer alone, once, far less than the whole chain.
    expect(spread!.pulled.map((p) => p.node).sort()).toEqual(["b", "c"]);
    for (const p of spread!.pulled) {
      expect(p.downloaded_bytes).toBeLessThanOrEqual(1.2 * spread!.layer_bytes);
      expect(p.downloaded_bytes * 4).toBeLessThan(p.transfer_bytes);
    }
    // Every child, wherever it runs, sees what the source wrote.
    const seen = await Promise.all(
      sandboxes.map(async (c) => {
        const out = await node("b").call<{ stdout: string; stderr: string; exit_code: number }>("POST", `/v1/sandboxes/${c.id}/exec`, {
          cmd: "md5sum -c /root/state.md5 && echo ok; ls -la /root",
        });
        return { id: c.id, node: c.node, status: out.status, ...out.body };
      }),
    );
    const wrong = seen.filter((x) => !/^ok$/m.test(x.stdout ?? ""));
    expect(wrong, JSON.stringify(wrong)).toEqual([]);
    await killAll([...sandboxes, source!]);
  }, 300_000);
});
