// cleanup: what crashes and time limits leave behind, across sandboxes, branches and temp dirs.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { recoverBranches } from "../branch/branch.js";
import { forkdRunDir, shmDir, snapshotsDir, vmsRunDir } from "../common/config.js";
import { removeEgressNamespace, removeSandboxEgress, sandboxEgressUids } from "../net/netns.js";
import { expireSandboxes, reapSandbox, sandboxAlive } from "../sandbox/lifecycle.js";
import { sandboxes } from "../store/state.js";
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
export async function cleanup(): Promise<CleanupReport> {
  const report: CleanupReport = {
    reaped: [],
    expired: await expireSandboxes(),
    failedBranches: recoverBranches(),
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
    await reapSandbox(row);
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
    await removeRunDir(dir);
    report.strayRunDirs.push(name);
  }
  await releaseStaleUids();
  for (const uid of await sandboxEgressUids().catch(() => [])) {
    if (fs.existsSync(path.join(forkdRunDir(), "uids", String(uid)))) continue;
    await removeSandboxEgress(uid);
    report.strayEgressRules.push(uid);
  }
  // Unused: no sandbox left and no VM being started (each owns a runtime dir first); namespacePids is checked inside too.
  const vmDirsLeft = await fsp.readdir(vmsRunDir()).catch(() => [] as string[]);
  if (sandboxes.list().length === 0 && vmDirsLeft.length === 0) report.egressNamespaceRemoved = await removeEgressNamespace();
  for (const base of [snapshotsDir(), path.join(shmDir(), "images")]) {
    let names: string[] = [];
    try {
      names = await fsp.readdir(base);
    } catch {
      continue;
    }
    for (const name of names) {
      const m = /(?:^\.tmp-|^\.rm-|\.tmp-)(\d+)-[0-9a-f]+$/.exec(name);
      if (!m) continue;
      if (isAlive(Number(m[1]))) continue;
      await fsp.rm(path.join(base, name), { recursive: true, force: true });
      report.strayTempDirs.push(path.join(base, name));
    }
  }
  return report;
}
