// Staged images are evicted least recently used, never one a fork in progress
// holds, and work in progress on shmem counts against the budget. Real files and
// a real SQLite state in private dirs; no VM needed.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { enforceStageBudget, evictableStagedBytes, evictStaged, holdStaged, inProgressStageBytes, staged } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-staging-"));
const MIB = 2 ** 20;
const saved = { home: process.env.FORKD_HOME, shm: process.env.FORKD_SHM_DIR, budget: process.env.FORKD_STAGE_BUDGET_MIB };

/** A staged image of `mib` MiB written for real, registered as used at `usedAt`. */
function stage(tag: string, mib: number, usedAt: number): string {
  const key = `${tag}@0123456789abcdef`;
  const dir = path.join(process.env.FORKD_SHM_DIR!, "images", key);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const file = path.join(dir, "memory.bin");
  fs.writeFileSync(file, Buffer.alloc(mib * MIB, 1));
  staged.upsert({ key, tag, path: file, bytes: fs.statSync(file).blocks * 512, last_used_ms: usedAt });
  return key;
}

beforeAll(() => {
  process.env.FORKD_HOME = path.join(root, "home");
  process.env.FORKD_SHM_DIR = path.join(root, "shm");
  fs.mkdirSync(process.env.FORKD_HOME, { mode: 0o700 });
  fs.mkdirSync(path.join(process.env.FORKD_SHM_DIR, "images"), { recursive: true, mode: 0o700 });
  fs.chmodSync(process.env.FORKD_SHM_DIR, 0o700);
});

afterAll(() => {
  for (const [k, v] of [
    ["FORKD_HOME", saved.home],
    ["FORKD_SHM_DIR", saved.shm],
    ["FORKD_STAGE_BUDGET_MIB", saved.budget],
  ] as const) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  fs.rmSync(root, { recursive: true, force: true });
});

describe("staged image eviction", () => {
  it("evicts least recently used first, skipping an image a fork holds until it lets go", async () => {
    const oldest = stage("oldest", 2, 1000);
    const middle = stage("middle", 2, 2000);
    const newest = stage("newest", 2, 3000);
    const release = holdStaged(oldest);
    expect(evictableStagedBytes()).toBe(4 * MIB);
    expect(await evictStaged(1)).toBe(2 * MIB);
    const left = () => staged.list().map((r) => r.key);
    expect(left()).toEqual([oldest, newest]);
    expect(fs.existsSync(path.join(process.env.FORKD_SHM_DIR!, "images", middle))).toBe(false);
    expect(fs.existsSync(path.join(process.env.FORKD_SHM_DIR!, "images", oldest, "memory.bin"))).toBe(true);
    release();
    release(); // twice is once
    expect(await evictStaged(1)).toBe(2 * MIB);
    expect(left()).toEqual([newest]);
  });

  it("counts work in progress on shmem against the budget", async () => {
    const keep = stage("kept", 1, 5000);
    const idle = stage("idle", 2, 4000);
    // A snapshot being written: a dot-dir on shmem that no staged row counts yet.
    const work = path.join(process.env.FORKD_SHM_DIR!, "images", ".tmp-1-0123abcd");
    fs.mkdirSync(work, { mode: 0o700 });
    fs.writeFileSync(path.join(work, "memory.bin"), Buffer.alloc(3 * MIB, 1));
    expect(await inProgressStageBytes()).toBe(3 * MIB);
    // Staged: 2 MiB left from above (least recently used), 2 idle, 1 kept = 5 MiB, within a 6 MiB budget
    // alone; with the 3 MiB in progress it is over, and only the least recently used one goes.
    process.env.FORKD_STAGE_BUDGET_MIB = "6";
    await enforceStageBudget(keep);
    expect(staged.list().map((r) => r.key)).toEqual([idle, keep]);
  });
});
