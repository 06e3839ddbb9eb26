// forkd never changes the mode or owner of a directory it did not create. The VMM
// launcher once chmod'ed 0755 every ancestor of every path it exposed to a VMM
// (the mount namespace does not shield an inode's mode), which left /tmp and
// /dev/shm 0755 on every machine that ran forkd. Here the VM paths (snapshot
// parent, child) run with their state under /tmp, under
// /dev/shm and under a private 0700 parent, and every directory above and at the
// roots keeps its mode and owner.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { CLI } from "../helpers/env.js";

const realImages = path.join(process.env.FORKD_HOME ?? "/var/lib/forkd", "images");
const testRoot = process.env.FORKD_TEST_ROOT ?? "/tmp";

type Owned = { mode: string; uid: number; gid: number };

/** Mode and owner of `dir` and of every directory above it. */
function modesUpFrom(dir: string): Record<string, Owned> {
  const out: Record<string, Owned> = {};
  for (let d = dir; ; d = path.dirname(d)) {
    const st = fs.statSync(d);
    out[d] = { mode: (st.mode & 0o7777).toString(8), uid: st.uid, gid: st.gid };
    if (d === path.dirname(d)) return out;
  }
}

/** A forkd root at `root` (made `mode`): its own home, runtime and staging dirs, the shared images linked in. */
function forkdRoot(root: string, mode: number): Record<string, string> {
  fs.mkdirSync(root, { mode });
  fs.chmodSync(root, mode);
  const env = { FORKD_HOME: path.join(root, "home"), FORKD_RUN_DIR: path.join(root, "run"), FORKD_SHM_DIR: path.join(root, "shm") };
  for (const dir of Object.values(env)) fs.mkdirSync(dir, { mode: 0o700 });
  if (fs.existsSync(realImages)) fs.symlinkSync(realImages, path.join(env.FORKD_HOME, "images"));
  return env;
}

function forkd(env: Record<string, string>, args: string[]) {
  const res = spawnSync(process.execPath, [CLI, ...args], {
    encoding: "utf8",
    timeout: 300_000,
    env: { ...process.env, ...env },
  });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

/**
 * The VM paths, between them exposing every kind of path a VMM is given: a
 * snapshot parent (image, kernel, its runtime dir, the snapshot's memory dir) and
 * a child (the staged memory image's dir on FORKD_SHM_DIR).
 */
function runVmPaths(env: Record<string, string>): void {
  const snap = forkd(env, ["snapshot", "--tag", "modes"]);
  expect(snap.code, snap.stderr).toBe(0);
  const fork = forkd(env, ["fork", "--tag", "modes", "-n", "1", "--json"]);
  expect(fork.code, fork.stderr).toBe(0);
  forkd(env, ["kill", "--all"]);
}

const made: { root: string; env: Record<string, string> }[] = [];

afterAll(() => {
  for (const { root, env } of made) {
    forkd(env, ["kill", "--all"]);
    fs.rmSync(root, { recursive: true, force: true });
  }
});

describe("running VMs leaves the host's directories as they were", () => {
  const cases = [
    { name: "directly under /tmp", parent: () => "/tmp", mode: 0o755 },
    { name: "directly under /dev/shm", parent: () => "/dev/shm", mode: 0o755 },
    {
      name: "under a private 0700 parent",
      parent: () => {
        const p = fs.mkdtempSync(path.join(testRoot, "private-"));
        fs.chmodSync(p, 0o700);
        return p;
      },
      mode: 0o700,
    },
  ];
  for (const c of cases) {
    it(`with forkd's state ${c.name}`, () => {
      const parent = c.parent();
      const root = path.join(parent, `forkd-modes-${process.pid}-${made.length}`);
      const env = forkdRoot(root, c.mode);
      made.push({ root: parent === "/tmp" || parent === "/dev/shm" ? root : parent, env });
      const watched = [env.FORKD_HOME!, env.FORKD_RUN_DIR!, env.FORKD_SHM_DIR!, "/tmp", "/dev/shm"];
      const before = Object.assign({}, ...watched.map(modesUpFrom)) as Record<string, Owned>;
      runVmPaths(env);
      const after = Object.fromEntries(Object.keys(before).map((d) => [d, modesUpFrom(d)[d]]));
      expect(after).toEqual(before);
    }, 600_000);
  }
});
