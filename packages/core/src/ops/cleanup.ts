// cleanup: what crashes and time limits leave behind, across sandboxes, branches and temp dirs.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { recoverBranches } from "../branch/branch.js";
import { forkdRunDir, shmDir, snapshotsDir, vmsRunDir } from "../common/config.js";
import { removeEgressNamespace, removeSandboxEgress, sandboxEgressUids } from "../net/netns.js";
import { expireSandboxes, reapSandbox, sandboxAlive } from "../sandbox/lifecycle.js";
import { branches, sandboxes } from "../store/state.js";
import { runtimePaths } from "../vmm/plan.js";
import { isAlive, isOurQemu, releaseStaleUids, removeRunDir } from "../vmm/process.js";

export type CleanupReport = {
  reaped: string[];
  expired: string[];
  failedBranches: string[];
  strayRunDirs: string[];
  strayTempDirs: string[];
  /** uids whose egress rules outlived their sandbox. */
  strayEgressRules: number[];
  /** The egress namespace was removed: no VM used it any more. */
  egressNamespaceRemoved: boolean;
};

/**
 * Reap sandboxes whose VMM is gone, runtime dirs nobody owns, and snapshot temp
 * dirs whose writer died. Never touches a live process that is not provably ours.
 */
export async function cleanup(opts: { dryRun?: boolean } = {}): Promise<CleanupReport> {
  const act = !opts.dryRun;
  const report: CleanupReport = {
    reaped: [],
    expired: act ? await expireSandboxes() : sandboxes.expired(Date.now()).map((r) => r.id),
    failedBranches: act
      ? recoverBranches()
      : branches
          .list()
          .filter((b) => b.status === "writing" && !isAlive(b.owner_pid))
          .map((b) => b.tag),
    strayRunDirs: [],
    strayTempDirs: [],
    strayEgressRules: [],
    egressNamespaceRemoved: false,
  };
  const known = new Set<string>();
  for (const row of sandboxes.list()) {
    if (sandboxAlive(row)) {
      known.add(row.run_dir);
      continue;
    }
    if (act) await reapSandbox(row);
    report.reaped.push(row.id);
  }
  let dirs: string[] = [];
  try {
    dirs = await fsp.readdir(vmsRunDir());
  } catch {
    // no runtime dir yet
  }
  for (const name of dirs) {
    const dir = path.join(vmsRunDir(), name);
    if (known.has(dir)) continue;
    const pid = Number((await fsp.readFile(runtimePaths(dir).pidfile, "utf8").catch(() => "")).trim());
    // A VM being started right now (by `forkd run` or a fork in progress) owns its dir.
    if (Number.isInteger(pid) && pid > 0 && isOurQemu(pid, dir)) continue;
    const stat = await fsp.stat(dir).catch(() => undefined);
    if (stat && Date.now() - stat.mtimeMs < 60_000 && !(await fsp.readFile(runtimePaths(dir).pidfile).catch(() => undefined))) {
      continue; // just created; QEMU has not written its pid file yet
    }
    if (act) await removeRunDir(dir);
    report.strayRunDirs.push(name);
  }
  if (!act) return { ...report, strayTempDirs: await strayTempDirs() };
  await releaseStaleUids();
  for (const uid of await sandboxEgressUids().catch(() => [])) {
    if (fs.existsSync(path.join(forkdRunDir(), "uids", String(uid)))) continue;
    await removeSandboxEgress(uid);
    report.strayEgressRules.push(uid);
  }
  // Unused: no sandbox left and no VM being started (each owns a runtime dir first); namespacePids is checked inside too.
  const vmDirsLeft = await fsp.readdir(vmsRunDir()).catch(() => [] as string[]);
  if (sandboxes.list().length === 0 && vmDirsLeft.length === 0) report.egressNamespaceRemoved = await removeEgressNamespace();
  for (const dir of await strayTempDirs()) {
    await fsp.rm(dir, { recursive: true, force: true });
    report.strayTempDirs.push(dir);
  }
  return report;
}

/**
 * Temp dirs whose writer died. Names are matched whole: forkd's own temp names
 * carry the writer's pid, and a tag can never look like one (snapshot dirs never
 * start with a dot; staged images are TAG@DIGEST, and a tag has no '@').
 */
const TEMP_NAME = {
  snapshots: /^\.(?:tmp|rm)-(\d+)-[0-9a-f]{8}$/,
  staged: /^(?:\.(?:tmp|rm)-|[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}@[0-9a-f]{16}\.tmp-)(\d+)-[0-9a-f]{8}$/,
};

export function isStrayTempName(kind: keyof typeof TEMP_NAME, name: string): number | undefined {
  const m = TEMP_NAME[kind].exec(name);
  return m ? Number(m[1]) : undefined;
}

async function strayTempDirs(): Promise<string[]> {
  const out: string[] = [];
  for (const [kind, base] of [
    ["snapshots", snapshotsDir()],
    ["staged", path.join(shmDir(), "images")],
  ] as const) {
    const names = await fsp.readdir(base).catch(() => [] as string[]);
    for (const name of names) {
      const pid = isStrayTempName(kind, name);
      if (pid === undefined || isAlive(pid)) continue;
      out.push(path.join(base, name));
    }
  }
  return out;
}
