// rmi: unregister a snapshot, and with --force kill the sandboxes forked from it first.
import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import { snapshotsDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { fsyncDir } from "../common/fsutil.js";
import { killSandbox } from "../sandbox/lifecycle.js";
import { getSnapshot } from "../store/snapshots.js";
import { stagedPath, stageKey } from "../store/staging.js";
import { branches, sandboxes, staged } from "../store/state.js";
import { isAlive } from "../vmm/process.js";

export type RemoveSnapshotOpts = { force?: boolean };

export async function removeSnapshot(tag: string, opts: RemoveSnapshotOpts = {}): Promise<{ killed: string[] }> {
  const snapshot = await getSnapshot(tag);
  const live = sandboxes.byTag(tag).filter((s) => isAlive(s.pid));
  if (live.length > 0 && !opts.force) {
    throw new ForkdError(
      "conflict",
      `snapshot ${tag} has ${live.length} live sandbox(es) (${live.map((s) => s.id).join(", ")}); kill them first or use --force`,
      { tag, sandboxes: live.map((s) => s.id) },
    );
  }
  const killed: string[] = [];
  for (const s of live) {
    await killSandbox(s.id);
    killed.push(s.id);
  }
  // Unregister first (rename to a dot-dir) so a crash mid-delete never leaves a half snapshot listed.
  const doomed = path.join(snapshotsDir(), `.rm-${process.pid}-${randomBytes(4).toString("hex")}`);
  await fsp.rename(snapshot.dir, doomed);
  await fsyncDir(snapshotsDir());
  await fsp.rm(doomed, { recursive: true, force: true });
  await fsp.rm(path.dirname(stagedPath(snapshot)), { recursive: true, force: true });
  staged.remove(stageKey(snapshot));
  branches.remove(tag);
  return { killed };
}
