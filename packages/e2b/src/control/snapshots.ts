// E2B's snapshots are forkd BRANCHes of a running sandbox: the capture becomes a
// snapshot tag, which is a template (Sandbox.create(snapshotId) forks from it).
// Which snapshots came from which E2B sandbox is kept in $FORKD_HOME/e2b/snapshots.json,
// so GET /snapshots lists E2B's own (not every forkd snapshot) and filters by sandbox.
import fs from "node:fs";
import path from "node:path";
import { writeFileAtomic } from "@forkd/atomic";
import { getSnapshot, isForkdError, listSnapshots, removeSnapshot, startBranch } from "@forkd/core";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";
import { BASE_SNAPSHOT_TAG, BASE_TEMPLATE } from "./templates.js";

export type E2bSnapshotRecord = { snapshotID: string; sandboxID: string; createdAtMs: number };

function recordsFile(e2b: E2bContext): string {
  return path.join(e2b.deps.home, "e2b", "snapshots.json");
}

function readRecords(e2b: E2bContext): E2bSnapshotRecord[] {
  try {
    const parsed: unknown = JSON.parse(fs.readFileSync(recordsFile(e2b), "utf8"));
    return Array.isArray(parsed) ? (parsed as E2bSnapshotRecord[]).filter((r) => typeof r?.snapshotID === "string") : [];
  } catch {
    return [];
  }
}

async function writeRecords(e2b: E2bContext, records: E2bSnapshotRecord[]): Promise<void> {
  fs.mkdirSync(path.dirname(recordsFile(e2b)), { recursive: true, mode: 0o700 });
  await writeFileAtomic(recordsFile(e2b), JSON.stringify(records), { mode: 0o600 });
}

let writing: Promise<unknown> = Promise.resolve();
/** Read-modify-write of the one file, one at a time. */
function updateRecords(e2b: E2bContext, change: (records: E2bSnapshotRecord[]) => E2bSnapshotRecord[]): Promise<void> {
  const next = writing.then(() => writeRecords(e2b, change(readRecords(e2b))));
  writing = next.catch(() => {});
  return next;
}

/** BRANCH the sandbox into a snapshot named `name` (a forkd tag) or a generated one. */
export async function createE2bSnapshot(e2b: E2bContext, sandboxID: string, name: string | undefined): Promise<E2bSnapshotRecord> {
  return e2b.sandboxes.exclusive(sandboxID, async () => {
    const record = e2b.sandboxes.require(sandboxID);
    if (!record.forkdId) throw new E2bHttpError(409, `sandbox ${sandboxID} is paused; connect to it (resume) before snapshotting`);
    const tag = name ?? `e2b-snap-${sandboxID.slice(0, 24)}-${Date.now().toString(36)}`;
    let started: Awaited<ReturnType<typeof startBranch>>;
    try {
      started = await startBranch(record.forkdId, { tag });
    } catch (err) {
      if (isForkdError(err) && err.code === "invalid_tag") throw new E2bHttpError(400, `invalid snapshot name: ${err.message}`);
      if (isForkdError(err) && err.code === "conflict") throw new E2bHttpError(409, err.message);
      throw err;
    }
    const done = await started.done;
    if (done.status !== "ready") throw new E2bHttpError(500, `snapshot of ${sandboxID} failed: ${done.error ?? "unknown"}`);
    const snap: E2bSnapshotRecord = { snapshotID: tag, sandboxID, createdAtMs: Date.now() };
    await updateRecords(e2b, (records) => [...records.filter((r) => r.snapshotID !== tag), snap]);
    return snap;
  });
}

/** E2B's snapshots that still exist, newest first, optionally of one sandbox or by name. */
export async function listE2bSnapshots(e2b: E2bContext, filter: { sandboxID?: string; name?: string }): Promise<E2bSnapshotRecord[]> {
  const existing = new Set((await listSnapshots()).map((s) => s.tag));
  return readRecords(e2b)
    .filter((r) => existing.has(r.snapshotID))
    .filter((r) => !filter.sandboxID || r.sandboxID === filter.sandboxID)
    .filter((r) => !filter.name || r.snapshotID === filter.name)
    .sort((a, b) => b.createdAtMs - a.createdAtMs || a.snapshotID.localeCompare(b.snapshotID));
}

/** DELETE /templates/:id: forkd's rmi (refused while sandboxes run from it: 409). */
export async function deleteE2bTemplate(e2b: E2bContext, templateID: string): Promise<void> {
  const tag = templateID === BASE_TEMPLATE ? BASE_SNAPSHOT_TAG : templateID;
  try {
    await getSnapshot(tag);
  } catch (err) {
    if (isForkdError(err) && (err.code === "snapshot_not_found" || err.code === "invalid_tag"))
      throw new E2bHttpError(404, `template '${templateID.slice(0, 64)}' not found`);
    throw err;
  }
  try {
    await removeSnapshot(tag);
  } catch (err) {
    if (isForkdError(err) && err.code === "conflict") throw new E2bHttpError(409, err.message);
    throw err;
  }
  await updateRecords(e2b, (records) => records.filter((r) => r.snapshotID !== tag));
}
