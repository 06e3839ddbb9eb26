// cleanup: what crashes and time limits leave behind, across sandboxes, branches and
// temp dirs. It is also start-up recovery: every step of snapshot, fork, BRANCH, rmi
// and unpack records its intent before it acts (a "starting" row, a "writing"
// BRANCH that may have paused its source, a runtime dir naming its owner, a dot-dir
// named by its writer's pid), so whatever a writer that died left half done is
// finished or undone here, and what a living writer holds is never touched.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { branchAbandoned, recoverBranches } from "../branch/branch.js";
import { forkdRunDir, shmDir, snapshotsDir, vmsRunDir } from "../common/config.js";
import { readVmmFile } from "../common/fsutil.js";
import { isAlive } from "../common/pid.js";
import { hubDir } from "../hub/download.js";
import { removeEgressNamespace, removeSandboxEgress, sandboxEgressUids } from "../net/netns.js";
import { abandonStartingSandbox, expireSandboxes, reapSandbox, sandboxAlive, startingOwned } from "../sandbox/lifecycle.js";
import { removeStaleHolderRecords } from "../store/sealed-images.js";
import { listSnapshots, tagDir } from "../store/snapshots.js";
import { stageKey } from "../store/staging.js";
import { branches, sandboxes, staged } from "../store/state.js";
import { sandboxState } from "../store/state-rules.js";
import { runtimePaths } from "../vmm/plan.js";
import { findOurQemus, isOurVmm, killAndWait, releaseStaleUids, removeRunDir, runDirOwnerAlive } from "../vmm/process.js";

export type CleanupReport = {
  reaped: string[];
  expired: string[];
  failedBranches: string[];
  /** Sandboxes an interrupted BRANCH had left paused, running again. */
  resumedSources: string[];
  /** Children whose starter died before they answered: their VMM killed, their row and files removed. */
  abandonedStarts: string[];
  strayRunDirs: string[];
  strayTempDirs: string[];
  /** Staged memory images (or their rows) that no registered snapshot owns. */
  strayStaged: string[];
  /** uids whose egress rules outlived their sandbox. */
  strayEgressRules: number[];
  /** The egress namespace was removed: no VM used it any more. */
  egressNamespaceRemoved: boolean;
};

/**
 * Reap sandboxes whose VMM is gone, runtime dirs nobody owns, and snapshot temp
 * dirs whose writer died; finish or undo what a dead writer left half done. Never
 * touches a live process that is not provably ours, nor anything a live writer holds.
 */
export async function cleanup(opts: { dryRun?: boolean } = {}): Promise<CleanupReport> {
  const act = !opts.dryRun;
  // First: a source an interrupted BRANCH left paused must run again before anything else looks at it.
  const recovered = act
    ? await recoverBranches()
    : {
        failed: branches
          .list()
          .filter(branchAbandoned)
          .map((b) => b.tag),
        resumed: [] as string[],
      };
  const report: CleanupReport = {
    reaped: [],
    expired: act ? await expireSandboxes() : sandboxes.expired(Date.now()).map((r) => r.id),
    failedBranches: recovered.failed,
    resumedSources: recovered.resumed,
    abandonedStarts: [],
    strayRunDirs: [],
    strayTempDirs: [],
    strayStaged: [],
    strayEgressRules: [],
    egressNamespaceRemoved: false,
  };
  const known = new Set<string>();
  for (const row of sandboxes.list()) {
    if (sandboxState(row) === "starting") {
      if (startingOwned(row)) {
        known.add(row.run_dir);
        continue;
      }
      if (act) await abandonStartingSandbox(row);
      report.abandonedStarts.push(row.id);
      continue;
    }
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
    const owner = runDirOwnerAlive(dir);
    if (owner === true) continue; // a VM its maker is still starting or running (`forkd run`, a snapshot parent)
    if (owner === undefined) {
      // A dir from before owners were recorded: judged by its QEMU and its age.
      const pid = Number(((await readVmmFile(runtimePaths(dir).pidfile, 32)) ?? "").toString().trim());
      if (Number.isInteger(pid) && pid > 0 && isOurVmm(pid, dir)) continue;
      const stat = await fsp.stat(dir).catch(() => undefined);
      if (stat && Date.now() - stat.mtimeMs < 60_000 && !(await readVmmFile(runtimePaths(dir).pidfile, 32))) {
        continue; // just created; QEMU has not written its pid file yet
      }
    } else if (act) {
      // Its maker died and no record owns it: a VMM still in it is an orphan.
      for (const pid of findOurQemus(dir)) await killAndWait(pid, dir, undefined, 200);
    }
    if (act) await removeRunDir(dir);
    report.strayRunDirs.push(name);
  }
  if (!act) return { ...report, strayTempDirs: await strayTempDirs(), strayStaged: await strayStaged(false) };
  await releaseStaleUids();
  // A holder exits once its staged file is gone; its record is then stale.
  await removeStaleHolderRecords();
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
  report.strayStaged = await strayStaged(true);
  for (const lock of await staleDownloadLocks()) {
    await fsp.rm(lock, { force: true });
    report.strayTempDirs.push(lock);
  }
  return report;
}

/**
 * Download locks (NAME.lock holding a pid) whose holder died. The next pull takes
 * such a lock over anyway; removed so nothing of a killed pull stays but what it
 * can resume from (.partial and verified blobs, kept on purpose: see the README).
 */
export async function staleDownloadLocks(): Promise<string[]> {
  const dir = path.join(hubDir(), "blobs");
  const out: string[] = [];
  for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
    if (!name.endsWith(".lock")) continue;
    const holder = Number((await fsp.readFile(path.join(dir, name), "utf8").catch(() => "")).trim());
    if (!isAlive(holder)) out.push(path.join(dir, name));
  }
  return out;
}

/** What a staged image's dir is called: TAG@ and 16 hex digits of its memory digest (stageKey). */
const STAGED_NAME = /^([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})@([0-9a-f]{16})$/;

/**
 * Staged images whose snapshot is gone (an rmi cut short after its commit point),
 * rows naming images that are gone, and images of a registered snapshot whose row
 * a crash kept from being written (added back, so the budget counts them).
 * Staged dirs are read before snapshots: a snapshot is registered before its image
 * is staged, so every image read has its snapshot visible when it has one.
 */
async function strayStaged(act: boolean): Promise<string[]> {
  const base = path.join(shmDir(), "images");
  const names = await fsp.readdir(base).catch(() => [] as string[]);
  const owners = new Map((await listSnapshots()).map((s) => [stageKey(s), s]));
  const rows = new Map(staged.list().map((r) => [r.key, r]));
  const stray: string[] = [];
  for (const name of names) {
    if (!STAGED_NAME.test(name)) continue;
    const dir = path.join(base, name);
    const owner = owners.get(name);
    if (!owner) {
      stray.push(dir);
      if (act) {
        await fsp.rm(dir, { recursive: true, force: true });
        staged.remove(name);
      }
      continue;
    }
    if (!rows.has(name) && act) {
      const st = await fsp.stat(path.join(dir, "memory.bin")).catch(() => undefined);
      if (st)
        staged.upsert({ key: name, tag: owner.tag, path: path.join(dir, "memory.bin"), bytes: st.blocks * 512, last_used_ms: Date.now() });
    }
  }
  for (const row of rows.values()) {
    if (owners.has(row.key) && fs.existsSync(row.path)) continue;
    stray.push(`row ${row.key}`);
    if (act) staged.remove(row.key);
  }
  if (act) {
    // A ready BRANCH row outlives its snapshot only when an rmi was cut short before removing it.
    for (const row of branches.list()) {
      if (row.status === "ready" && !fs.existsSync(path.join(tagDir(row.tag), "manifest.json"))) branches.remove(row.tag);
    }
  }
  return stray;
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
