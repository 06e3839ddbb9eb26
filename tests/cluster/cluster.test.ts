// A forkd cluster on one machine: a real etcd on loopback and three daemons as
// separate processes (own home, run dir, shm dir), real 128 MiB VMs on node a.
// Any node answers any call for a sandbox (forwarded, streamed, one hop); the tag
// namespace is one; a node that dies or stops loses its lease and its sandboxes
// answer 503 node_unreachable until it rejoins and re-publishes; a kill asked for
// meanwhile is applied when it returns; with etcd down each node keeps serving its
// own sandboxes and refuses new work with cluster_unavailable.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Controller } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI } from "../helpers/env.js";
import {
  clusterTokenFile,
  type EtcdHandle,
  killNode,
  type NodeHandle,
  startEtcd,
  startNode,
  TEST_LEASE_TTL_S,
  waitFor,
} from "./helpers.js";

const root = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? os.tmpdir(), "cluster-"));
const TAG = "cbase";
let etcd: EtcdHandle;
let a: NodeHandle;
let b: NodeHandle;
let c: NodeHandle;
const api = (n: NodeHandle) => new Controller({ url: n.url, token: n.token });

/** A raw call (status, headers and body as they came), bearer token of the node called. */
async function call(n: NodeHandle, method: string, route: string, body?: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${n.url}${route}`, {
    method,
    headers: {
      authorization: `Bearer ${n.token}`,
      ...(body === undefined ? {} : { "content-type": "application/json" }),
      ...headers,
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await res.text();
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = text;
  }
  return { status: res.status, headers: res.headers, json: json as Record<string, unknown> & unknown[] };
}

async function liveNames(n: NodeHandle): Promise<string[]> {
  return (await api(n).clusterNodes()).map((x) => x.name).sort();
}

beforeAll(async () => {
  etcd = await startEtcd(root, 1);
  const tokenFile = clusterTokenFile(root);
  const base = { root: process.env.FORKD_TEST_ROOT ?? root, etcd: etcd.url, clusterTokenFile: tokenFile };
  [a, b, c] = await Promise.all([startNode({ ...base, name: "a" }), startNode({ ...base, name: "b" }), startNode({ ...base, name: "c" })]);
  await api(a).createSnapshot({ tag: TAG, memory_mib: 128 });
}, 600_000);

afterAll(async () => {
  for (const n of [a, b, c]) {
    if (!n) continue;
    if (n.child.signalCode === null && n.child.exitCode === null) n.child.kill("SIGCONT");
    await killNode(n);
    spawnSync(process.execPath, [CLI, "kill", "--all"], { env: n.env });
    fs.rmSync(n.env.FORKD_SHM_DIR!, { recursive: true, force: true });
  }
  await etcd?.stop();
});

describe("a cluster of three daemons", () => {
  let sb1: string;
  let sb2: string;

  it("joins every node and lists them, with capacity, load and the snapshots each holds", async () => {
    await waitFor("three nodes", async () => ((await liveNames(c)).length === 3 ? true : undefined));
    const nodes = await api(b).clusterNodes();
    expect(nodes.map((n) => [n.name, n.self])).toEqual([
      ["a", false],
      ["b", true],
      ["c", false],
    ]);
    for (const n of nodes) {
      expect(n.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      expect(n.capacity.max_sandboxes).toBe(1000);
      expect(n.draining).toBe(false);
    }
    // Node a's record shows the snapshot once a heartbeat has carried it.
    await waitFor("a's record lists the snapshot", async () =>
      (await api(c).clusterNodes()).find((n) => n.name === "a")?.snapshots.some((s) => s.tag === TAG) ? true : undefined,
    );
    const cli = spawnSync(process.execPath, [CLI, "cluster", "ls", "--json"], {
      env: { ...process.env, FORKD_URL: c.url, FORKD_TOKEN: c.token },
      encoding: "utf8",
    });
    expect(cli.status, cli.stderr).toBe(0);
    expect((JSON.parse(cli.stdout) as { name: string }[]).map((n) => n.name)).toEqual(["a", "b", "c"]);
  });

  it("drains and undrains a node (kept in etcd, shown on every node)", async () => {
    await api(a).setDraining("c", true);
    expect((await api(b).clusterNodes()).find((n) => n.name === "c")?.draining).toBe(true);
    await api(b).setDraining("c", false);
    expect((await api(a).clusterNodes()).find((n) => n.name === "c")?.draining).toBe(false);
    expect((await call(a, "POST", "/v1/cluster/nodes/..%2Fx/drain")).status).toBe(400);
  });

  it("has one tag namespace: creating a tag another node created is a 400 on any node", async () => {
    for (const n of [b, c]) {
      const res = await call(n, "POST", "/v1/snapshots", { tag: TAG, image: "base", memory_mib: 128 });
      expect(res.status, JSON.stringify(res.json)).toBe(400);
      expect(res.json.error).toMatch(/already exists in the cluster \(created on node a\)/);
    }
    expect((await call(a, "POST", "/v1/snapshots", { tag: TAG, image: "base", memory_mib: 128 })).status).toBe(400);
  });

  it("routes exec (streamed), files and BRANCH of a sandbox on node a through nodes b and c", async () => {
    // One at a time: two restores at once on a loaded 2-core host can outwait the agent's deadline.
    sb1 = (await api(a).createSandboxes({ snapshot_tag: TAG, n: 1 }))[0]!.id;
    sb2 = (await api(a).createSandboxes({ snapshot_tag: TAG, n: 1 }))[0]!.id;
    // Streamed through b: the NDJSON lines arrive as the guest writes them.
    const chunks: string[] = [];
    const exit = await api(b).execStream(
      sb1,
      { cmd: "for i in 1 2 3; do echo line$i; sleep 1; done; hostname" },
      {
        onStdout: (d) => chunks.push(d.toString()),
      },
    );
    expect(exit.exit_code).toBe(0);
    expect(chunks.join("")).toBe(`line1\nline2\nline3\n${sb1}\n`);
    expect(chunks.length).toBeGreaterThan(1);
    // Files up through c, down through b.
    const data = Buffer.from(Array.from({ length: 70_000 }, (_, i) => i % 251)).toString("base64");
    await api(c).files(sb1, { action: "write", path: "/root/up.bin", data, encoding: "base64" });
    const read = await api(b).files<{ data: string; encoding?: string }>(sb1, { action: "read", path: "/root/up.bin" });
    expect(Buffer.from(read.data, read.encoding === "base64" ? "base64" : "utf8").toString("base64")).toBe(data);
    // A plain exec through c says which node served it.
    const res = await call(c, "POST", `/v1/sandboxes/${sb1}/exec`, { cmd: "cat /proc/sys/kernel/hostname" });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-forkd-node")).toBe("a");
    expect(fs.readFileSync(c.audit, "utf8")).toContain('"forwarded_to":"a"');
    // BRANCH through b: written on a, its tag claimed for the cluster.
    const branch = await api(b).branchSandbox(sb1, { tag: "cbranch" });
    expect(branch.tag).toBe("cbranch");
    expect((await api(a).getSnapshot("cbranch")).tag).toBe("cbranch");
    expect((await call(c, "POST", "/v1/snapshots", { tag: "cbranch", image: "base" })).status).toBe(400);
  });

  it("merges the lists across nodes with a node field, and keeps a single node's wire", async () => {
    const listed = (await call(c, "GET", "/v1/sandboxes")).json as { id: string; node: string }[];
    expect(listed.filter((s) => s.id === sb1 || s.id === sb2).map((s) => s.node)).toEqual(["a", "a"]);
    const snaps = (await call(b, "GET", "/v1/snapshots")).json as { tag: string; node: string }[];
    expect(snaps.filter((s) => s.tag === TAG).map((s) => s.node)).toEqual(["a"]);
  });

  it("serves a forwarded call only with the cluster token, and never forwards it again", async () => {
    const spoofed = await call(b, "POST", `/v1/sandboxes/${sb1}/exec`, { cmd: "true" }, { "x-forkd-forwarded-by": "a" });
    expect(spoofed.status).toBe(401);
    const token = fs.readFileSync(path.join(root, "cluster-token"), "utf8").trim();
    // With the token it is a node-to-node call: served on b itself, which does not run sb1 (404, not forwarded).
    const oneHop = await call(
      b,
      "POST",
      `/v1/sandboxes/${sb1}/exec`,
      { cmd: "true" },
      { "x-forkd-forwarded-by": "a", "x-forkd-cluster-token": token },
    );
    expect(oneHop.status).toBe(404);
  });

  it("kill -9 of node a: its lease lapses, its sandboxes answer 503 node_unreachable, a kill is deferred; it rejoins and re-publishes", async () => {
    await killNode(a, "SIGKILL");
    await waitFor(
      "a's lease to lapse",
      async () => (!(await liveNames(b)).includes("a") ? true : undefined),
      (TEST_LEASE_TTL_S + 20) * 1000,
    );
    const down = await call(b, "POST", `/v1/sandboxes/${sb1}/exec`, { cmd: "true" });
    expect(down.status).toBe(503);
    expect(down.json).toMatchObject({ code: "node_unreachable", details: { node: "a" } });
    expect(String(down.json.remediation)).toMatch(/rejoin/);
    const deferred = await call(c, "DELETE", `/v1/sandboxes/${sb2}`);
    expect(deferred.status).toBe(202);
    expect(deferred.json).toMatchObject({ id: sb2, node: "a", deferred: true });
    await a.restart();
    await waitFor("a to rejoin", async () => ((await liveNames(b)).includes("a") ? true : undefined), 60_000);
    // Its VMM outlived the daemon: re-adopted, re-published, reachable from b again.
    expect((await api(b).exec(sb1, { cmd: "cat /root/up.bin | wc -c" })).stdout.trim()).toBe("70000");
    // The kill asked for while it was away was applied when it came back.
    expect((await call(a, "GET", `/v1/sandboxes/${sb2}`)).status).toBe(404);
    expect((await call(b, "GET", `/v1/sandboxes/${sb2}`)).status).toBe(404);
    expect(a.stderr()).toMatch(/applied 1 delete\(s\) made while away/);
  });

  it("SIGSTOP of node a: the lease lapses (503 node_unreachable); after SIGCONT it notices, rejoins and answers again", async () => {
    a.child.kill("SIGSTOP");
    try {
      await waitFor(
        "a's lease to lapse",
        async () => (!(await liveNames(c)).includes("a") ? true : undefined),
        (TEST_LEASE_TTL_S + 20) * 1000,
      );
      expect((await call(c, "POST", `/v1/sandboxes/${sb1}/ping`)).json).toMatchObject({ code: "node_unreachable" });
    } finally {
      a.child.kill("SIGCONT");
    }
    await waitFor("a to rejoin", async () => ((await liveNames(c)).includes("a") ? true : undefined), 60_000);
    expect((await api(c).ping(sb1)).hostname).toBe(sb1);
    expect(a.stderr()).toMatch(/lost its cluster lease/);
  });

  it("etcd down: each node serves its own sandboxes and refuses new work with cluster_unavailable; back: new work again", async () => {
    await etcd.stop();
    try {
      // What runs on a keeps answering on a.
      expect((await api(a).exec(sb1, { cmd: "echo still" })).stdout).toBe("still\n");
      // A new tag cannot be claimed for the cluster.
      const snap = await call(a, "POST", "/v1/snapshots", { tag: "cnew", image: "base", memory_mib: 128 });
      expect(snap.status).toBe(503);
      expect(snap.json.code).toBe("cluster_unavailable");
      // Once a heartbeat has gone unanswered, no fork either (probed with a body the schema refuses: no VM if it passed).
      await waitFor(
        "a to refuse new work",
        async () => ((await call(a, "POST", "/v1/sandboxes", { snapshot_tag: TAG, bogus: 1 })).status === 503 ? true : undefined),
        (TEST_LEASE_TTL_S + 20) * 1000,
      );
      const fork = await call(a, "POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1 });
      expect(fork.status).toBe(503);
      expect(fork.json.code).toBe("cluster_unavailable");
      // The list still answers with what it holds.
      const listed = await call(a, "GET", "/v1/sandboxes");
      expect(listed.status).toBe(200);
      expect((listed.json as { id: string }[]).map((s) => s.id)).toContain(sb1);
      // A sandbox on another node cannot be located without etcd: a clear 503, not a 404.
      expect((await call(b, "POST", `/v1/sandboxes/${sb1}/ping`)).json.code).toBe("cluster_unavailable");
    } finally {
      await etcd.start();
    }
    // etcd renews every lease when it restarts, so a's old record may be listed before a has rejoined: a's own answer decides.
    await waitFor(
      "a to take new work",
      async () => ((await call(a, "POST", "/v1/sandboxes", { snapshot_tag: TAG, bogus: 1 })).status === 422 ? true : undefined),
      60_000,
    );
    const [child] = await api(a).createSandboxes({ snapshot_tag: TAG, n: 1 });
    expect((await api(b).ping(child!.id)).hostname).toBe(child!.id);
  });
});
