// Hot pools through a real daemon with real VMs: a pool fills, forks take from it
// (each child handed out unique), it refills, it survives kill -9 and a restart,
// and rmi drains it. Performance is bench pool's business, never asserted here.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Controller, ForkdApiError } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join("/dev/shm", `forkd-test-pool-${process.pid}`);
const TAG = "pool-base";
const SIZE = 3;
const MAX_SANDBOXES = 12;
let daemon: DaemonHandle;
let api: Controller;

async function start(): Promise<void> {
  daemon = await startDaemonProcess(env.runDir, ["--max-sandboxes", String(MAX_SANDBOXES)]);
  api = new Controller({ url: daemon.url, token: daemon.token });
}

async function pooledIds(): Promise<string[]> {
  return (await api.listSandboxes({ pool: true })).filter((s) => s.pool === TAG).map((s) => s.id);
}

/** Poll until the pool holds `size` ready children; their ids. */
async function waitFull(timeoutMs = 120_000): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const pool = await api.getPool(TAG);
    if (pool.ready === SIZE && pool.starting === 0) return pooledIds();
    if (Date.now() > deadline) throw new Error(`pool not refilled: ${JSON.stringify(pool)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function sh(id: string, cmd: string): Promise<string> {
  return (await api.exec(id, { cmd })).stdout.trim();
}

beforeAll(async () => {
  await start();
  await api.createSnapshot({ tag: TAG, memory_mib: 128, warm_eval: ["globalThis.warm = 'yes'"] });
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("hot pool", () => {
  it("refuses sizes it cannot keep, naming the limit", async () => {
    const over = await api.setPool(TAG, MAX_SANDBOXES + 1).catch((e: unknown) => e);
    expect(over).toBeInstanceOf(ForkdApiError);
    expect((over as ForkdApiError).status).toBe(400);
    expect((over as ForkdApiError).message).toMatch(/limit of 12 sandboxes \(--max-sandboxes\)/);
    expect(((await api.setPool(TAG, -1).catch((e: unknown) => e)) as ForkdApiError).status).toBe(400);
    expect(((await api.setPool("no-such-tag", 1).catch((e: unknown) => e)) as ForkdApiError).status).toBe(404);
    const res = await fetch(`${daemon.url}/v1/snapshots/${TAG}/pool`, {
      method: "PUT",
      headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
      body: JSON.stringify({ size: 1.5 }),
    });
    expect(res.status).toBe(422);
    expect((await api.getPool(TAG)).size).toBe(0);
  });

  let pooledAtStart: string[] = [];
  it("fills to its size with children hidden from the users' list, shown in metrics", async () => {
    expect(await api.setPool(TAG, SIZE)).toMatchObject({ tag: TAG, size: SIZE });
    pooledAtStart = await waitFull();
    expect(pooledAtStart).toHaveLength(SIZE);
    expect((await api.listSandboxes()).map((s) => s.id)).not.toEqual(expect.arrayContaining([pooledAtStart[0]]));
    expect(await api.listPools()).toEqual([expect.objectContaining({ tag: TAG, size: SIZE, ready: SIZE })]);
    const metrics = await api.metrics();
    expect(metrics).toMatch(new RegExp(`forkd_pool_ready\\{tag="${TAG}"\\} ${SIZE}`));
    expect(metrics).toMatch(new RegExp(`forkd_pool_size\\{tag="${TAG}"\\} ${SIZE}`));
    // Filled at background priority: nice 19 on the VMM's threads.
    const pid = (await api.getSandbox(pooledAtStart[0]!)).pid;
    expect(fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ")[16]).toBe("19");
  });

  let handedOut: string[] = [];
  it("hands pooled children out first, each one unique, at normal priority", async () => {
    const children = await api.createSandboxes({ snapshot_tag: TAG, n: 2, metadata: { who: "test" } });
    handedOut = children.map((c) => c.id);
    expect(pooledAtStart).toEqual(expect.arrayContaining(handedOut));
    for (const c of children) {
      expect(c.pool).toBeNull();
      expect(c.metadata).toEqual({ who: "test" });
      expect(c.timings?.pool_claim_ms).toBeGreaterThan(0);
      expect(c.timings?.restore_ms).toBe(0);
    }
    expect((await api.listSandboxes()).map((s) => s.id)).toEqual(expect.arrayContaining(handedOut));
    const [a, b] = handedOut as [string, string];
    expect((await api.ping(a)).hostname).toBe(a);
    expect((await api.ping(b)).hostname).toBe(b);
    expect(await sh(a, "hostname")).toBe(a);
    const rng = async (id: string) =>
      sh(id, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id");
    const [ra, rb] = [await rng(a), await rng(b)];
    expect(ra.split("\n")[0]).toMatch(/^[0-9a-f]{32}$/);
    expect(ra.split("\n")[0]).not.toBe(rb.split("\n")[0]);
    expect(ra.split("\n")[1]).not.toBe(rb.split("\n")[1]);
    // The clock is the host's at hand-out, within a little.
    const guestNow = Number(await sh(a, "date +%s"));
    expect(Math.abs(guestNow - Date.now() / 1000)).toBeLessThan(5);
    expect((await api.eval(a, { code: "warm" })).value).toBe("yes");
    const pid = (await api.getSandbox(a)).pid;
    expect(fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ")[16]).toBe("0");
    expect(await api.metrics()).toMatch(/forkd_pool_claim_seconds_count 2/);
  });

  it("refills in the background, and replaces a pooled child killed by id", async () => {
    const refilled = await waitFull();
    expect(refilled.filter((id) => !pooledAtStart.includes(id))).toHaveLength(2);
    const victim = refilled[0]!;
    await api.deleteSandbox(victim);
    const replaced = await waitFull();
    expect(replaced).not.toContain(victim);
    expect(qemuPidsUnder(env.runDir).length).toBe(SIZE + handedOut.length);
  });

  it("a fork the pool cannot stand for (a memory limit) restores fresh and leaves the pool alone", async () => {
    const before = await pooledIds();
    const [fresh] = await api.createSandboxes({ snapshot_tag: TAG, n: 1, memory_limit_mib: 512 });
    expect(before).not.toContain(fresh!.id);
    expect(fresh!.timings?.pool_claim_ms).toBeUndefined();
    expect(await pooledIds()).toEqual(before);
    await api.deleteSandbox(fresh!.id);
  });

  it("survives kill -9 and a restart: its children re-adopted, its size kept", async () => {
    const before = (await pooledIds()).sort();
    await stopDaemon(daemon, "SIGKILL");
    await start();
    expect(Number(/re-adopted (\d+) sandbox/.exec(daemon.stderr())?.[1])).toBe(SIZE + handedOut.length);
    expect(await api.getPool(TAG)).toMatchObject({ size: SIZE, ready: SIZE });
    expect((await pooledIds()).sort()).toEqual(before);
    // A re-adopted pooled child is handed out like any.
    const [child] = await api.createSandboxes({ snapshot_tag: TAG, n: 1 });
    expect(before).toContain(child!.id);
    expect((await api.ping(child!.id)).hostname).toBe(child!.id);
    handedOut.push(child!.id);
    await waitFull();
  });

  it("keeps its snapshot from a plain rmi only through users' sandboxes; rmi --force drains it", async () => {
    const refused = await api.deleteSnapshot(TAG).catch((e: unknown) => e);
    expect((refused as ForkdApiError).status).toBe(409);
    const named = [...(((refused as ForkdApiError).details?.sandboxes as string[] | undefined) ?? [])].sort();
    expect(named).toEqual([...handedOut].sort());
    const pooled = await pooledIds();
    await api.deleteSnapshot(TAG, { force: true });
    expect(qemuPidsUnder(env.runDir)).toEqual([]);
    expect(await api.listSandboxes({ pool: true })).toEqual([]);
    expect(await api.getPool(TAG)).toMatchObject({ size: 0, ready: 0, starting: 0 });
    expect(pooled).toHaveLength(SIZE);
    // Nothing refills a pool whose snapshot is gone.
    await new Promise((r) => setTimeout(r, 1500));
    expect(qemuPidsUnder(env.runDir)).toEqual([]);
  });

  it("a plain rmi with only pooled children drains the pool and succeeds", async () => {
    await api.createSnapshot({ tag: "pool-two", memory_mib: 128 });
    await api.setPool("pool-two", 1);
    await api.waitForPool("pool-two", { timeoutMs: 120_000 });
    await api.deleteSnapshot("pool-two");
    expect(qemuPidsUnder(env.runDir)).toEqual([]);
    expect(await api.listPools()).toEqual([]);
  });
});
