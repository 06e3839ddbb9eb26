// Three etcd members and two daemons given all three endpoints (no VMs): the
// cluster keeps its membership, catalog and tag namespace while one member is down
// (two of three are a quorum), and a daemon with a name already held is refused.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Controller } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { clusterTokenFile, type EtcdHandle, killNode, type NodeHandle, startEtcd, startNode, waitFor } from "./helpers.js";

const root = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? os.tmpdir(), "cluster-3m-"));
let etcd: EtcdHandle;
let x: NodeHandle;
let y: NodeHandle;
let tokenFile: string;
const api = (n: NodeHandle) => new Controller({ url: n.url, token: n.token });

beforeAll(async () => {
  etcd = await startEtcd(root, 3);
  tokenFile = clusterTokenFile(root);
  const base = { root: process.env.FORKD_TEST_ROOT ?? root, etcd: etcd.url, clusterTokenFile: tokenFile };
  [x, y] = await Promise.all([startNode({ ...base, name: "x" }), startNode({ ...base, name: "y" })]);
}, 300_000);

afterAll(async () => {
  for (const n of [x, y]) if (n) await killNode(n);
  await etcd?.stop();
});

describe("a cluster on three etcd members", () => {
  it("joins both nodes through a list of endpoints", async () => {
    expect(etcd.url).toMatch(/^etcd:\/\/127\.0\.0\.1:\d+,127\.0\.0\.1:\d+,127\.0\.0\.1:\d+$/);
    await waitFor("both nodes", async () => ((await api(x).clusterNodes()).length === 2 ? true : undefined));
    expect((await api(y).clusterNodes()).map((n) => n.name)).toEqual(["x", "y"]);
  });

  it("keeps working with one member down: drains, tag claims and a rejoin go through the other two", async () => {
    await etcd.stop(0);
    try {
      await api(x).setDraining("y", true);
      expect((await api(y).clusterNodes()).find((n) => n.name === "y")?.draining).toBe(true);
      await api(y).setDraining("y", false);
      // A tag claim is an etcd transaction: a create on x that fails later (no such image) gives the claim back.
      const res = await fetch(`${x.url}/v1/snapshots`, {
        method: "POST",
        headers: { authorization: `Bearer ${x.token}`, "content-type": "application/json" },
        body: JSON.stringify({ tag: "t3m", image: "no-such-image", memory_mib: 128 }),
      });
      expect(res.status).toBe(404);
      // Released: y may create it (it fails the same way, after claiming, rather than with a 400 for the tag).
      const onY = await fetch(`${y.url}/v1/snapshots`, {
        method: "POST",
        headers: { authorization: `Bearer ${y.token}`, "content-type": "application/json" },
        body: JSON.stringify({ tag: "t3m", image: "no-such-image", memory_mib: 128 }),
      });
      expect(onY.status).toBe(404);
      // A node stopped and started again rejoins through the members left.
      await killNode(y, "SIGTERM");
      expect((await api(x).clusterNodes()).map((n) => n.name)).toEqual(["x"]);
      await y.restart();
      expect((await api(x).clusterNodes()).map((n) => n.name)).toEqual(["x", "y"]);
    } finally {
      await etcd.start(0);
    }
  });

  it("refuses a second daemon with a name a live node holds", async () => {
    const clash = startNode({ root: path.join(root, "clash"), name: "x", etcd: etcd.url, clusterTokenFile: tokenFile });
    await expect(clash).rejects.toThrow(/another daemon holds the node name 'x'/);
  });
});
