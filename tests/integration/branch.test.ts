// BRANCH through the real daemon: every mode, fire-and-forget, bad input, and
// what children of a branch see (the first markers, never the second).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { sandboxes, shmDir } from "@forkd/core";
import { Controller, ForkdApiError } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join("/dev/shm", `forkd-test-${process.pid}`);
const TAG = "branch-base";
let daemon: DaemonHandle;
let api: Controller;

async function sh(id: string, cmd: string): Promise<string> {
  const res = await api.exec(id, { cmd });
  return res.stdout;
}

async function evalIn(id: string, code: string): Promise<unknown> {
  return (await api.eval(id, { code })).value;
}

async function forkOne(tag: string): Promise<string> {
  const res = await api.createSandboxes({ snapshot_tag: tag, n: 1 });
  expect(res).toHaveLength(1);
  return res[0]!.id;
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
  api = new Controller({ url: daemon.url, token: daemon.token });
  await api.createSnapshot({ tag: TAG, warm_eval: ["globalThis.base = 'warm'"] });
});

afterAll(async () => {
  await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe.each(["live", "diff", "full"] as const)("%s BRANCH", (mode) => {
  it("captures the source as it was: children see the first markers, not the second; the source sees both", async () => {
    const source = await forkOne(TAG);
    await sh(source, "echo first > /root/marker1");
    await evalIn(source, "globalThis.m1 = 'first'");
    const branched = await api.branchSandbox(source, { tag: `b-${mode}`, mode });
    expect(branched).toMatchObject({ tag: `b-${mode}`, mode, status: "ready", branched_from: source, parent: TAG });
    expect(branched.pause_ms).toBeGreaterThan(0);
    expect(branched.memory_bytes).toBeGreaterThan(0);
    await sh(source, "echo second > /root/marker2");
    await evalIn(source, "globalThis.m2 = 'second'");
    const child = await forkOne(`b-${mode}`);
    expect(await sh(child, "cat /root/marker1; test -e /root/marker2 && echo LEAK || echo clean")).toBe("first\nclean\n");
    expect(await evalIn(child, "[base, m1, typeof m2]")).toEqual(["warm", "first", "undefined"]);
    expect(await sh(source, "cat /root/marker1 /root/marker2")).toBe("first\nsecond\n");
    expect(await evalIn(source, "[m1, m2]")).toEqual(["first", "second"]);
    const listed = (await api.listSnapshots()).find((s) => s.tag === `b-${mode}`);
    expect(listed).toMatchObject({ parent: TAG, branched_from: source });
  });
});

describe("fire and forget", () => {
  it("answers 202 writing as soon as the source resumes, refuses to fork until ready, then forks", async () => {
    const source = await forkOne(TAG);
    await evalIn(source, "globalThis.nowait = 1");
    const started = await api.branchSandbox(source, { tag: "b-nowait", wait: false });
    expect(started.status).toBe("writing");
    const early = await api.createSandboxes({ snapshot_tag: "b-nowait", n: 1 }).catch((e: unknown) => e);
    if (early instanceof ForkdApiError) {
      expect(early.status).toBe(409);
    }
    await api.waitForSnapshot("b-nowait");
    expect((await api.snapshotStatus("b-nowait")).status).toBe("ready");
    const child = await forkOne("b-nowait");
    expect(await evalIn(child, "nowait")).toBe(1);
  });

  it("a branch of a branch works", async () => {
    const child = await forkOne("b-live");
    await evalIn(child, "globalThis.gen = 2");
    await api.branchSandbox(child, { tag: "b-live-2" });
    const grandchild = await forkOne("b-live-2");
    expect(await evalIn(grandchild, "[m1, gen]")).toEqual(["first", 2]);
    expect((await api.listSnapshots()).find((s) => s.tag === "b-live-2")).toMatchObject({ parent: "b-live" });
  });
});

describe("bad input", () => {
  it("answers unknown sandbox 404, existing tag 409, bad mode 422, and leaves nothing behind", async () => {
    const source = await forkOne(TAG);
    const call = (id: string, body: unknown) =>
      fetch(`${daemon.url}/v1/sandboxes/${id}/branch`, {
        method: "POST",
        headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    expect((await call("sb-000000000000", {})).status).toBe(404);
    expect((await call(source, { tag: "b-live" })).status).toBe(409);
    expect((await call(source, { mode: "turbo" })).status).toBe(422);
    expect((await call(source, { tag: "../x" })).status).toBe(400);
    expect(fs.readdirSync(path.join(env.home, "snapshots")).filter((n) => n.startsWith("."))).toEqual([]);
    expect((await api.ping(source)).hostname).toBe(source);
  });
});

describe("live BRANCH is the page capture", () => {
  it("is forkable as soon as the source runs again: children see the source at the capture, the source runs on", async () => {
    const source = await forkOne(TAG);
    // A guest clock that only moves while the source runs, and state written since its restore.
    await evalIn(source, "globalThis.ticks = 0; setInterval(() => globalThis.ticks++, 5); globalThis.at = 'capture'");
    await sh(source, "head -c 2000000 /dev/urandom > /root/blob; md5sum /root/blob > /root/blob.md5");
    const started = await api.branchSandbox(source, { tag: "b-page", mode: "live", wait: false });
    expect(started).toMatchObject({ status: "writing", mode: "live" });
    expect(started.pause_ms).toBeGreaterThan(0);
    // Before it is registered: a fork restores from the capture itself.
    const early = await api.createSandboxes({ snapshot_tag: "b-page", n: 1 });
    const ticksAfter = Number(await evalIn(source, "ticks"));
    await evalIn(source, "globalThis.at = 'later'");
    await sh(source, "echo later > /root/later");
    await api.waitForSnapshot("b-page");
    const late = await forkOne("b-page");
    for (const child of [early[0]!.id, late]) {
      expect(await evalIn(child, "at")).toBe("capture");
      expect(await sh(child, "md5sum -c /root/blob.md5; test -e /root/later && echo LEAK || echo clean")).toBe("/root/blob: OK\nclean\n");
      expect((await api.ping(child)).hostname).toBe(child);
    }
    // The source kept running through and after the capture: its clock moved on, its later state is its own.
    await new Promise((r) => setTimeout(r, 300));
    expect(Number(await evalIn(source, "ticks"))).toBeGreaterThan(ticksAfter);
    expect(await evalIn(source, "at")).toBe("later");
    expect(await api.getSnapshot("b-page")).toMatchObject({ parent: TAG, storage: "diff", mode: "live", branched_from: source });
  });

  it("stages the source's image again when it was evicted while the source ran, and captures it live", async () => {
    const source = await forkOne(TAG);
    await evalIn(source, "globalThis.evicted = 'yes'");
    const row = sandboxes.get(source)!;
    // The source maps its staged image through the sealed memfd named after the stage key.
    const maps = fs.readFileSync(`/proc/${row.pid}/maps`, "utf8");
    const key = /\/memfd:forkd-staged-image:(\S+) \(deleted\)$/m.exec(maps)?.[1];
    expect(key).toBeDefined();
    const image = path.join(shmDir(), "images", key!, "memory.bin");
    expect(fs.existsSync(image)).toBe(true);
    // What an eviction does: the staged copy is removed while the source still maps its memfd.
    fs.rmSync(path.dirname(image), { recursive: true, force: true });
    const branched = await api.branchSandbox(source, { tag: "b-evicted", mode: "live" });
    expect(branched).toMatchObject({ status: "ready", mode: "live" });
    expect(fs.existsSync(image)).toBe(true);
    const child = await forkOne("b-evicted");
    expect(await evalIn(child, "[base, evicted]")).toEqual(["warm", "yes"]);
  });
});

describe("restart during a BRANCH", () => {
  it("marks a half-written branch failed and removes its remains; the source keeps running", async () => {
    const source = await forkOne(TAG);
    const started = await api.branchSandbox(source, { tag: "b-interrupted", mode: "live", wait: false });
    expect(started.status).toBe("writing");
    await stopDaemon(daemon, "SIGKILL");
    daemon = await startDaemonProcess(env.runDir);
    api = new Controller({ url: daemon.url, token: daemon.token });
    const status = await api.snapshotStatus("b-interrupted");
    // It may have finished before the kill landed; if not, it must say failed, never ready-but-broken.
    if (status.status !== "ready") {
      expect(status.status).toBe("failed");
      expect(status.error).toMatch(/interrupted/);
      const fork = await api.createSandboxes({ snapshot_tag: "b-interrupted", n: 1 }).catch((e: unknown) => e);
      expect((fork as ForkdApiError).status).toBe(404);
    }
    expect(fs.readdirSync(path.join(env.home, "snapshots")).filter((n) => n.startsWith("."))).toEqual([]);
    expect((await api.ping(source)).hostname).toBe(source);
  });
});

describe("through the CLI", () => {
  it("forkd branch prints the pause and registers the snapshot", () => {
    const forked = spawnSync(process.execPath, [CLI, "fork", "--tag", TAG, "-n", "1", "--json"], {
      env: { ...process.env, FORKD_TOKEN: daemon.token },
      encoding: "utf8",
    });
    const [child] = JSON.parse(forked.stdout) as { id: string }[];
    const res = spawnSync(process.execPath, [CLI, "branch", child!.id, "--tag", "b-cli", "--mode", "diff", "--json"], {
      env: { ...process.env, FORKD_TOKEN: daemon.token },
      encoding: "utf8",
    });
    expect(res.status, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toMatchObject({ tag: "b-cli", mode: "diff", status: "ready" });
  });
});
