// Every crash window, reproduced: a real daemon is started with FORKD_FAULT naming
// one step, so it SIGKILLs itself exactly there while doing real work on real VMs;
// the test looks at what the crash left (the window is real), restarts the daemon
// and shows that start-up recovery finished or undid it: no orphan QEMU, no source
// left paused, no half snapshot listed, no temp/staged/run dir without an owner,
// and the live sandbox that was there before every crash still answers.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import {
  branches,
  type FaultStep,
  findLeftovers,
  getSnapshot,
  listSnapshots,
  QmpClient,
  runtimePaths,
  sandboxes,
  shmDir,
  snapshotsDir,
  staged,
  stagedPath,
  vmsRunDir,
} from "@forkd/core";
import { Controller } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join("/dev/shm", `forkd-crash-${process.pid}`);
const BASE = "crash-base";
let daemon: DaemonHandle | undefined;
let api: Controller;
/** A sandbox that lives through every crash: it must answer after each recovery. */
let bystander: string;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function start(extraEnv: Record<string, string> = {}): Promise<void> {
  if (daemon && daemon.child.exitCode === null && daemon.child.signalCode === null) await stopDaemon(daemon, "SIGTERM");
  await api?.close();
  const saved = Object.fromEntries(Object.keys(extraEnv).map((k) => [k, process.env[k]]));
  Object.assign(process.env, extraEnv);
  try {
    daemon = await startDaemonProcess(env.runDir);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  api = new Controller({ url: daemon.url, token: daemon.token });
}

/**
 * Start a daemon that dies at `step`, run `action` against it, and wait for that
 * death. Fails unless the daemon died of SIGKILL: a step never reached is a test
 * that proves nothing.
 */
async function crashAt(step: FaultStep | `${FaultStep}@${number}`, action: (a: Controller) => Promise<unknown>, extraEnv = {}) {
  await start({ FORKD_FAULT: step, ...extraEnv });
  const child = daemon!.child;
  const died = new Promise<NodeJS.Signals | null>((resolve) => child.once("exit", (_code, signal) => resolve(signal)));
  const request = action(api).then(
    () => "answered",
    (err: Error) => err.message,
  );
  const signal = await Promise.race([died, sleep(100_000).then(() => "still running" as const)]);
  expect(
    signal,
    `the daemon should have died at ${step}; the request: ${await Promise.race([request, sleep(10).then(() => "pending")])}`,
  ).toBe("SIGKILL");
  await request;
}

/** What recovery must leave: nothing half done, nothing orphaned, the bystander answering. */
async function expectRecovered(): Promise<void> {
  const left = await findLeftovers();
  expect(left).toEqual({ halfSnapshots: [], orphanVmms: [], pausedSources: [], leftoverFiles: [] });
  expect(await api.ping(bystander)).toMatchObject({ pong: true });
  expect(qemuPidsUnder(vmsRunDir()).sort()).toEqual(
    sandboxes
      .list()
      .map((r) => r.pid)
      .sort(),
  );
}

async function qmp<T>(id: string, fn: (q: QmpClient) => Promise<T>): Promise<T> {
  const client = await QmpClient.connect(runtimePaths(sandboxes.get(id)!.run_dir).qmp, { timeoutMs: 5000 });
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

const runStatus = (id: string) => qmp(id, async (q) => (await q.execute("query-status", {})).status);

async function forkable(tag: string): Promise<void> {
  const [child] = await api.createSandboxes({ snapshot_tag: tag, n: 1 });
  expect(await api.ping(child!.id)).toMatchObject({ pong: true });
  await api.deleteSandbox(child!.id);
}

const newRows = (before: Set<string>) => sandboxes.list().filter((r) => !before.has(r.id));

beforeAll(async () => {
  await start();
  await api.createSnapshot({ tag: BASE, memory_mib: 128 });
  const [child] = await api.createSandboxes({ snapshot_tag: BASE, n: 1 });
  bystander = child!.id;
  await api.eval(bystander, { code: "globalThis.before = 'every crash'" });
}, 240_000);

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  await api?.close();
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  spawnSync(process.execPath, [CLI, "cleanup", "-y"], { env: process.env });
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("fork", () => {
  it.each([
    ["fork.row-written", false],
    ["fork.before-launch", false],
    ["fork.launched", true],
    ["fork.before-cont", true],
    ["fork.before-confirm", true],
  ] as const)("%s: the child that never answered is killed and reaped", async (step, vmmRuns) => {
    const before = new Set(sandboxes.list().map((r) => r.id));
    await crashAt(step, (a) => a.createSandboxes({ snapshot_tag: BASE, n: 1 }));
    const [row] = newRows(before);
    // The intent was recorded before the VMM: the row says "starting" and where it lives.
    expect(row).toMatchObject({ state: "starting" });
    // The window is real: the VMM outlived its starter (it must outlive a daemon once it is a sandbox).
    if (vmmRuns) expect(qemuPidsUnder(row!.run_dir)).not.toEqual([]);
    await start();
    expect(daemon!.stderr()).toMatch(/undid 1 interrupted start/);
    expect(sandboxes.get(row!.id)).toBeUndefined();
    expect(qemuPidsUnder(row!.run_dir)).toEqual([]);
    expect(fs.existsSync(row!.run_dir)).toBe(false);
    await expectRecovered();
  });

  it("fork.confirmed: a child that answered before the crash is re-adopted and answers", async () => {
    const before = new Set(sandboxes.list().map((r) => r.id));
    await crashAt("fork.confirmed", (a) => a.createSandboxes({ snapshot_tag: BASE, n: 1 }));
    const [row] = newRows(before);
    expect(row).toMatchObject({ state: "running" });
    await start();
    expect(daemon!.stderr()).toMatch(/re-adopted 2 sandbox/);
    expect(await api.ping(row!.id)).toMatchObject({ pong: true });
    await expectRecovered();
    await api.deleteSandbox(row!.id);
  });
});

describe("BRANCH", () => {
  it.each([
    ["branch.claimed", "full", false],
    ["branch.full-stopped", "full", true],
    ["branch.full-written", "full", true],
    ["branch.diff-precopy", "diff", false],
    ["branch.diff-completed", "diff", true],
    ["branch.live-stopped", "live", true],
    ["branch.live-captured", "live", false],
    ["branch.materialising", "diff", false],
  ] as const)("%s (%s): the source runs again, the BRANCH is failed, nothing of it stays", async (step, mode, pausedByCrash) => {
    const tag = `crash-${step.replace(".", "-")}`;
    await crashAt(step, (a) => a.branchSandbox(bystander, { tag, mode }));
    expect(branches.get(tag)).toMatchObject({ status: "writing" });
    // The window is real: the capture stopped the source and only its dead writer would have resumed it.
    if (pausedByCrash) expect(await runStatus(bystander)).not.toBe("running");
    // The materialiser and the stream copier died with their daemon, before any recovery ran.
    await sleep(300);
    expect((await findLeftovers()).orphanVmms).toEqual([]);
    await start();
    if (pausedByCrash) expect(daemon!.stderr()).toMatch(/resumed 1 source/);
    expect(await runStatus(bystander)).toBe("running");
    expect(branches.get(tag)).toMatchObject({ status: "failed" });
    expect((await listSnapshots()).map((s) => s.tag)).not.toContain(tag);
    expect(await api.eval(bystander, { code: "before" })).toMatchObject({ value: "every crash" });
    await expectRecovered();
  });

  it("a diff pre-copy stops writing when its daemon dies: its copier dies, the migration fails, the source runs", async () => {
    // Capped so the copy is still going when the daemon is killed; no convergence bound to end it first.
    await start({ FORKD_BRANCH_MAX_MIBPS: "1", FORKD_DIFF_CONVERGE_MS: "600000" });
    const request = api.branchSandbox(bystander, { tag: "crash-precopy", mode: "diff" }).catch((err: Error) => err);
    const images = path.join(shmDir(), "images");
    let stream: string | undefined;
    for (const deadline = Date.now() + 60_000; !stream && Date.now() < deadline; await sleep(50)) {
      for (const name of fs.readdirSync(images).filter((n) => n.startsWith(".tmp-"))) {
        const file = path.join(images, name, "capture.stream");
        if ((fs.statSync(file, { throwIfNoEntry: false })?.size ?? 0) > 256 * 1024) stream = file;
      }
    }
    expect(stream, "the pre-copy should be writing its stream").toBeDefined();
    await stopDaemon(daemon!, "SIGKILL");
    await request;
    await sleep(500);
    const size = fs.statSync(stream!).size;
    await sleep(2000);
    // Nothing writes to /dev/shm any more: not the copier (gone), not QEMU (its migration failed).
    expect(fs.statSync(stream!).size).toBe(size);
    expect(writersOf(stream!)).toEqual([]);
    expect(await qmp(bystander, async (q) => (await q.execute("query-migrate", {})).status)).toMatch(/failed|cancelled/);
    expect(await runStatus(bystander)).toBe("running");
    await start();
    expect(fs.existsSync(path.dirname(stream!))).toBe(false);
    await expectRecovered();
  });

  it("a diff pre-copy that cannot converge is finished by stop-and-copy within its bound", async () => {
    // At 1 MiB/s the source's memory alone takes far longer than the test allows: only the bound
    // ends it (the first pass may take 12 × 500 ms, then the source is stopped and the rest copied).
    await start({ FORKD_BRANCH_MAX_MIBPS: "1", FORKD_DIFF_CONVERGE_MS: "500" });
    const t0 = Date.now();
    const branched = await api.branchSandbox(bystander, { tag: "crash-converge", mode: "diff" });
    expect(branched).toMatchObject({ status: "ready" });
    expect(Date.now() - t0).toBeLessThan(30_000);
    expect((await getSnapshot("crash-converge")).branch).toMatchObject({ mode: "diff", stopAndCopy: true });
    expect(await runStatus(bystander)).toBe("running");
    await forkable("crash-converge");
    await start();
    await expectRecovered();
  });
});

describe("snapshot", () => {
  it.each(["snapshot.parent-booted", "register.before-commit"] as const)(
    "%s: the parent died with its daemon, nothing is listed, no temp dir stays",
    async (step) => {
      const tag = `crash-${step.replace(".", "-")}`;
      await crashAt(step, (a) => a.createSnapshot({ tag, memory_mib: 128 }));
      await sleep(300);
      expect((await findLeftovers()).orphanVmms).toEqual([]);
      expect((await listSnapshots()).map((s) => s.tag)).not.toContain(tag);
      await start();
      expect(fs.readdirSync(snapshotsDir()).filter((n) => n.startsWith("."))).toEqual([]);
      await expectRecovered();
    },
  );

  it("register.committed: the snapshot is whole and forkable, its staged image owned and counted", async () => {
    const tag = "crash-committed";
    await crashAt("register.committed", (a) => a.createSnapshot({ tag, memory_mib: 128 }));
    expect((await listSnapshots()).map((s) => s.tag)).toContain(tag);
    await start();
    await expectRecovered();
    await forkable(tag);
    const snapshot = await getSnapshot(tag);
    expect(staged.list().map((r) => r.path)).toContain(stagedPath(snapshot));
    await api.deleteSnapshot(tag);
  });
});

describe("rmi", () => {
  it.each(["rmi.unregistered", "rmi.files-removed"] as const)(
    "%s: the snapshot is gone whole: no dot-dir, no staged image, no rows",
    async (step) => {
      const tag = `crash-${step.replace(".", "-")}`;
      await api.branchSandbox(bystander, { tag, mode: "diff" });
      const staging = stagedPath(await getSnapshot(tag));
      await crashAt(step, (a) => a.deleteSnapshot(tag));
      expect((await listSnapshots()).map((s) => s.tag)).not.toContain(tag);
      await start();
      expect(fs.existsSync(staging)).toBe(false);
      expect(staged.list().filter((r) => r.tag === tag)).toEqual([]);
      expect(branches.get(tag)).toBeUndefined();
      await expectRecovered();
    },
  );
});

describe("unpack", () => {
  // Over TCP a pack is named inside $FORKD_HOME/packs (the daemon confines it there).
  const pack = "chain.forkd.tar.zst";

  beforeAll(async () => {
    // A chain of two (a base and a BRANCH layer on it) that this store then no longer has.
    await api.createSnapshot({ tag: "crash-pk", memory_mib: 128 });
    const [source] = await api.createSandboxes({ snapshot_tag: "crash-pk", n: 1 });
    await api.branchSandbox(source!.id, { tag: "crash-pk-br", mode: "diff" });
    await api.deleteSandbox(source!.id);
    const job = await api.packSnapshot("crash-pk-br", { path: pack });
    expect(await api.waitForJob(job.id)).toMatchObject({ status: "succeeded" });
    await api.deleteSnapshot("crash-pk-br");
    await api.deleteSnapshot("crash-pk");
  }, 240_000);

  it("unpack.verified: nothing is registered and the verified files are removed", async () => {
    await crashAt("unpack.verified", (a) => a.unpackSnapshot({ path: pack }));
    await start();
    expect((await listSnapshots()).map((s) => s.tag)).not.toContain("crash-pk");
    await expectRecovered();
  });

  it("unpack.registering@2: the base is registered whole and forkable, its layer is not listed", async () => {
    await crashAt("unpack.registering@2", (a) => a.unpackSnapshot({ path: pack }));
    await start();
    const tags = (await listSnapshots()).map((s) => s.tag);
    expect(tags).toContain("crash-pk");
    expect(tags).not.toContain("crash-pk-br");
    await expectRecovered();
    await forkable("crash-pk");
  });
});

/** Processes that hold `file` open for writing as their stdout (the stream copier does). */
function writersOf(file: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readlinkSync(`/proc/${entry}/fd/1`) === file) pids.push(Number(entry));
    } catch {
      // exited, or not ours to read
    }
  }
  return pids;
}
