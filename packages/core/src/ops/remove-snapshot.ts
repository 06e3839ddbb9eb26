// rmi: unregister a snapshot. Snapshots stored as layers on it keep it (409 naming
// them) unless --cascade removes them too; live sandboxes keep it unless --force
// kills them first. A hot pool of a snapshot removed is drained first.
import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import { snapshotsDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { fsyncDir } from "../common/fsutil.js";
import { isAlive } from "../common/pid.js";
import { drainPool } from "../pool/pool.js";
import { killSandbox, startingOwned } from "../sandbox/lifecycle.js";
import { dependentsOf, subtreeOf } from "../store/chains.js";
import { getSnapshot, type SnapshotInfo } from "../store/snapshots.js";
import { stagedPath, stageKey } from "../store/staging.js";
import { branches, sandboxes, staged } from "../store/state.js";
import { sandboxState } from "../store/state-rules.js";

export type RemoveSnapshotOpts = {
  /** Kill the live sandboxes forked from the snapshots removed. */
  force?: boolean;
  /** Also remove every snapshot stored as a layer on this one, and theirs. */
  cascade?: boolean;
};

export async function removeSnapshot(tag: string, opts: RemoveSnapshotOpts = {}): Promise<{ killed: string[]; removed: string[] }> {
  const snapshot = await getSnapshot(tag);
  const dependents = await dependentsOf(tag);
  if (dependents.length > 0 && !opts.cascade) {
    throw new ForkdError(
      "conflict",
      `snapshot ${tag} is the base of ${dependents.map((d) => d.tag).join(", ")} (stored as layers on it); remove them first, use --cascade to remove them with it, or \`forkd compact\` one to a standalone copy`,
      { tag, dependents: dependents.map((d) => d.tag) },
    );
  }
  const doomed = opts.cascade ? await subtreeOf(tag) : [snapshot];
  // A child still being started from it counts: its image must stay until it answers or is undone.
  const live = doomed.flatMap((s) =>
    sandboxes.byTag(s.tag).filter((row) => (sandboxState(row) === "starting" ? startingOwned(row) : isAlive(row.pid))),
  );
  // Pooled children are the daemon's stock, not anyone's sandbox: they never keep a snapshot, they go with it.
  const users = live.filter((row) => !row.pool);
  if (users.length > 0 && !opts.force) {
    throw new ForkdError(
      "conflict",
      `snapshot ${tag}${doomed.length > 1 ? " and its dependents" : ""} have ${users.length} live sandbox(es) (${users.map((s) => s.id).join(", ")}); kill them first or use --force`,
      { tag, sandboxes: users.map((s) => s.id) },
    );
  }
  const killed: string[] = [];
  for (const s of doomed) killed.push(...(await drainPool(s.tag)));
  for (const s of users) {
    await killSandbox(s.id);
    killed.push(s.id);
  }
  // Leaves first: a crash midway leaves whole chains, never a layer without its base.
  for (const s of doomed) await unregister(s);
  return { killed, removed: doomed.map((s) => s.tag) };
}

async function unregister(snapshot: SnapshotInfo): Promise<void> {
  // Unregister first (rename to a dot-dir): that one rename is the commit point. A crash
  // after it leaves a .rm- dir, a staged image and rows that no listed snapshot owns,
  // and cleanup removes each of those; a crash before it leaves the snapshot whole.
  const doomed = path.join(snapshotsDir(), `.rm-${process.pid}-${randomBytes(4).toString("hex")}`);
  await fsp.rename(snapshot.dir, doomed);
  await fsyncDir(snapshotsDir());
  faultPoint("rmi.unregistered");
  await fsp.rm(doomed, { recursive: true, force: true });
  await fsp.rm(path.dirname(stagedPath(snapshot)), { recursive: true, force: true });
  faultPoint("rmi.files-removed");
  staged.remove(stageKey(snapshot));
  branches.remove(snapshot.tag);
}
