// What a crash may have left behind, counted (never removed: cleanup removes).
// After recovery every count must be zero; the crash-window tests and `forkd bench
// chaos` both ask this one function, so they judge recovery by the same rules.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { branchAbandoned } from "../branch/branch.js";
import { forkdRunDir, shmDir, snapshotsDir, vmsRunDir } from "../common/config.js";
import { isAlive } from "../common/pid.js";
import { imageFiles } from "../guest/image.js";
import { sandboxAlive } from "../sandbox/lifecycle.js";
import { listSnapshots, type SnapshotInfo } from "../store/snapshots.js";
import { stageKey } from "../store/staging.js";
import { branches, sandboxes, staged } from "../store/state.js";
import { sandboxState } from "../store/state-rules.js";
import { runtimePaths } from "../vmm/plan.js";
import { runDirOwnerAlive } from "../vmm/process.js";
import { QmpClient } from "../vmm/qmp.js";
import { isStrayTempName, staleDownloadLocks } from "./cleanup.js";

export type Leftovers = {
  /** Listed as ready but missing what a fork needs (files short or gone, a base or image gone), or a BRANCH left "writing" by a dead writer. */
  halfSnapshots: string[];
  /** QEMU processes under this instance's runtime dir that no live sandbox row and no living maker owns. */
  orphanVmms: { pid: number; runDir: string }[];
  /** Live sandboxes whose guest is not running (a capture stopped it and nobody resumed it). */
  pausedSources: { id: string; status: string }[];
  /** Runtime dirs, uid claims, temp and dot dirs, staged images and rows that nothing owns. */
  leftoverFiles: string[];
};

export async function findLeftovers(opts: { qmpTimeoutMs?: number } = {}): Promise<Leftovers> {
  const rows = sandboxes.list();
  const live = rows.filter((r) => sandboxState(r) !== "starting" && sandboxAlive(r));
  const ownedDirs = new Set(live.map((r) => r.run_dir));
  // A row still starting under a living starter is work in progress, not a leftover.
  for (const r of rows) if (sandboxState(r) === "starting" && isAlive(r.owner_pid ?? 0)) ownedDirs.add(r.run_dir);
  const held = (dir: string) => ownedDirs.has(dir) || runDirOwnerAlive(dir) === true;

  const orphanVmms: Leftovers["orphanVmms"] = [];
  const prefix = `${vmsRunDir()}/`;
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let cmdline: string;
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
    } catch {
      continue;
    }
    if (!cmdline.includes("qemu-system")) continue;
    const at = cmdline.indexOf(prefix);
    if (at < 0) continue;
    const runDir = prefix + (cmdline.slice(at + prefix.length).split(/[/\0,]/)[0] ?? "");
    if (!held(runDir)) orphanVmms.push({ pid: Number(entry), runDir });
  }

  const pausedSources: Leftovers["pausedSources"] = [];
  for (const row of live) {
    let qmp: QmpClient | undefined;
    try {
      qmp = await QmpClient.connect(runtimePaths(row.run_dir).qmp, { timeoutMs: opts.qmpTimeoutMs ?? 5000 });
      const { status } = await qmp.execute("query-status", {}, { timeoutMs: opts.qmpTimeoutMs ?? 5000 });
      if (status !== "running") pausedSources.push({ id: row.id, status });
    } catch (err) {
      pausedSources.push({ id: row.id, status: `unreachable: ${(err as Error).message}` });
    } finally {
      qmp?.close();
    }
  }

  const leftoverFiles: string[] = [];
  for (const name of await fsp.readdir(vmsRunDir()).catch(() => [] as string[])) {
    const dir = path.join(vmsRunDir(), name);
    if (!held(dir)) leftoverFiles.push(dir);
  }
  const uids = path.join(forkdRunDir(), "uids");
  for (const name of await fsp.readdir(uids).catch(() => [] as string[])) {
    const owner = await fsp.readFile(path.join(uids, name), "utf8").catch(() => "");
    if (!owner || !fs.existsSync(owner)) leftoverFiles.push(path.join(uids, name));
  }
  for (const name of await fsp.readdir(snapshotsDir()).catch(() => [] as string[])) {
    if (!name.startsWith(".")) continue;
    const pid = isStrayTempName("snapshots", name);
    if (pid !== undefined && isAlive(pid)) continue;
    leftoverFiles.push(path.join(snapshotsDir(), name));
  }
  const snapshots = await listSnapshots();
  const stagedBase = path.join(shmDir(), "images");
  const owners = new Set(snapshots.map((s) => stageKey(s)));
  for (const name of await fsp.readdir(stagedBase).catch(() => [] as string[])) {
    const pid = isStrayTempName("staged", name);
    if (pid !== undefined ? !isAlive(pid) : !owners.has(name)) leftoverFiles.push(path.join(stagedBase, name));
  }
  for (const row of staged.list()) if (!fs.existsSync(row.path)) leftoverFiles.push(`staged row ${row.key} (no file)`);
  leftoverFiles.push(...(await staleDownloadLocks()));

  const halfSnapshots = snapshots.filter((s) => snapshotIncomplete(s, snapshots) !== undefined).map((s) => s.tag);
  for (const row of branches.list()) if (branchAbandoned(row)) halfSnapshots.push(`${row.tag} (writing, writer gone)`);
  return { halfSnapshots, orphanVmms, pausedSources, leftoverFiles };
}

/** Why a listed snapshot could not be forked, judged from its files; undefined when nothing is missing. */
function snapshotIncomplete(s: SnapshotInfo, all: SnapshotInfo[]): string | undefined {
  const size = (file: string) => {
    try {
      return fs.statSync(file).size;
    } catch {
      return -1;
    }
  };
  if (size(s.vmstatePath) !== s.sizes.vmstateBytes) return "vmstate.bin";
  if (s.layer) {
    if (size(s.layerPath) !== s.layer.layerBytes) return "layer.bin";
    if (size(s.pagemapPath) !== s.layer.pagemapBytes) return "pagemap.bin";
    const parent = all.find((p) => p.tag === s.parent);
    if (parent?.memorySha256 !== s.layer.parentSha256) return `its base ${s.parent}`;
  } else if (size(s.memoryPath) !== s.sizes.memoryBytes) return "memory.bin";
  const image = imageFiles(s.image.name, s.image.digest);
  for (const file of [image.kernel, image.initrd, image.rootfs]) if (size(file) < 0) return file;
  return undefined;
}
