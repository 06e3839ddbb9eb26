// BRANCH: capture a running sandbox as a new snapshot. Capture pauses the source
// as briefly as the mode allows. Live mode is the page capture (live-capture.ts,
// shared with live fork-to-many): only the pages the guest wrote are copied, and the
// capture is forkable as soon as the source runs again. Full and diff write a whole
// migration stream; materialising turns it into an ordinary snapshot: RAM in a
// memory image, device state apart.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { setting } from "../common/settings.js";
import { UndoStack } from "../common/undo.js";
import { validateName } from "../common/validate.js";
import { planRestore } from "../sandbox/fork.js";
import { getSandbox, sandboxAlive } from "../sandbox/lifecycle.js";
import { ancestorsOf, MAX_CHAIN_DEPTH, stageSnapshot } from "../store/chains.js";
import { assertSnapshotOp, getSnapshot, registerSnapshot, type SnapshotInfo, snapshotWorkDirs } from "../store/snapshots.js";
import { type BranchRow, branches, sandboxes } from "../store/state.js";
import { sandboxAllows, sandboxState } from "../store/state-rules.js";
import { migrateToFile, openMigrationSink } from "../vmm/migration-sink.js";
import { runtimePaths } from "../vmm/plan.js";
import { grantToVmm, killAndWait, launchQemu, makeRunDir, newSandboxId, removeRunDir, sameProcess, selfIdentity } from "../vmm/process.js";
import { eventTimeMs, QmpClient, type QmpEvent, waitForMigration } from "../vmm/qmp.js";
import { captureLive, liveCaptureSupport } from "./live-capture.js";

type BranchMode = "full" | "diff" | "live";
const BRANCH_MODES: readonly BranchMode[] = ["full", "diff", "live"];
/** The modes that write a whole migration stream (live is the page capture). */
type StreamMode = Exclude<BranchMode, "live">;

type CaptureResult = {
  mode: StreamMode;
  /** Source stop to resume. */
  pauseMs: number;
  /** From the start of the capture until the source ran again. */
  resumedAfterMs: number;
  /** Settles when the whole stream is written. */
  completed: Promise<{ captureMs: number; streamBytes: number }>;
  /** diff only: pre-copy did not converge within its bound, so the source was stopped to finish the copy. */
  stopAndCopy?: boolean;
};

/**
 * How long diff pre-copy may chase dirty pages after its first pass over RAM before
 * the source is stopped to finish: a guest that dirties memory faster than it is
 * copied never converges on its own. The first pass may take 12 times as long.
 */
function diffConvergeMs(): number {
  return setting("diffConvergeMs");
}

/** Pre-copy passes over RAM before the same fallback, whichever bound comes first. */
const DIFF_MAX_PASSES = 20;

/** What a capture may write per second: unlimited unless FORKD_BRANCH_MAX_MIBPS caps the I/O it costs. */
function captureBandwidth(): number {
  const mib = setting("branchMaxMibps");
  return mib !== undefined ? Math.round(mib * 2 ** 20) : 64 * 2 ** 30;
}

function parseBranchMode(value: unknown): BranchMode {
  if (typeof value === "string" && (BRANCH_MODES as readonly string[]).includes(value)) return value as BranchMode;
  throw new ForkdError("bad_request", `mode must be one of ${BRANCH_MODES.join(", ")}, got '${String(value)}'`);
}

/**
 * Write a full migration stream of the running source to `streamPath` and make
 * sure the source runs again afterwards, whatever happens.
 *  full: stop, write everything, cont: the pause covers the whole write.
 *  diff: pre-copy while the source runs; QEMU pauses it only for the last dirty pages.
 */
async function captureSandbox(
  sandboxId: string,
  mode: StreamMode,
  streamPath: string,
  opts: { branchTag?: string } = {},
): Promise<CaptureResult> {
  const row = getSandbox(sandboxId, "capture");
  // Recorded before anything can pause the source, cleared once it surely runs:
  // a writer that dies in between leaves the row saying so, and recovery resumes it.
  const mayPause = (paused: boolean) => {
    if (opts.branchTag) branches.setSourcePaused(opts.branchTag, paused);
  };
  const qmp = await QmpClient.connect(runtimePaths(row.run_dir).qmp, { timeoutMs: 10_000 });
  const events: QmpEvent[] = [];
  qmp.on("event", (e) => events.push(e));
  const started = performance.now();
  let stoppedByUs = false;
  const sink = await openMigrationSink(row.run_dir, streamPath);
  const release = async () => {
    sink.close();
    qmp.close();
  };
  const recover = async (err: unknown): Promise<never> => {
    // Never leave the source paused because a capture failed.
    await qmp.execute("migrate_cancel", {}).catch(() => {});
    const status = await qmp.execute("query-status", {}).catch(() => undefined);
    if (stoppedByUs || (status && status.status !== "running")) await qmp.execute("cont", {}).catch(() => {});
    if ((await qmp.execute("query-status", {}).catch(() => undefined))?.status === "running") mayPause(false);
    await release();
    throw err;
  };
  const done = async () => {
    const streamBytes = await sink.written;
    return { captureMs: performance.now() - started, streamBytes };
  };
  try {
    await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: false }] });
    // Writing to a local file: no bandwidth cap; a short downtime target for pre-copy.
    await qmp.execute("migrate-set-parameters", { "max-bandwidth": captureBandwidth(), "downtime-limit": 50 });
    const uri = sink.uri;
    mayPause(true);
    if (mode === "full") {
      const t0 = performance.now();
      stoppedByUs = true;
      await qmp.execute("stop", {});
      faultPoint("branch.full-stopped");
      await qmp.execute("migrate", { uri });
      await waitForMigration(qmp, 600_000, "writing the full capture");
      faultPoint("branch.full-written");
      await qmp.execute("cont", {});
      stoppedByUs = false;
      mayPause(false);
      const pauseMs = performance.now() - t0;
      const completed = await done();
      await release();
      return { mode, pauseMs, resumedAfterMs: performance.now() - started, completed: Promise.resolve(completed) };
    }
    // diff
    await qmp.execute("migrate", { uri });
    const stopAndCopy = await precopy(qmp, () => {
      stoppedByUs = true;
    });
    faultPoint("branch.diff-completed");
    // QEMU stopped the source for the final copy (or we did) and left it in postmigrate.
    await qmp.execute("cont", {});
    stoppedByUs = false;
    mayPause(false);
    const stop = events.find((e) => e.event === "STOP");
    const resume = await waitEvent(qmp, events, "RESUME");
    const pauseMs = stop && resume ? eventTimeMs(resume) - eventTimeMs(stop) : Number.NaN;
    const completed = await done();
    await release();
    return {
      mode,
      pauseMs,
      resumedAfterMs: performance.now() - started,
      completed: Promise.resolve(completed),
      ...(stopAndCopy ? { stopAndCopy } : {}),
    };
  } catch (err) {
    return recover(err);
  }
}

/**
 * Wait for a pre-copy to complete, bounded: diffConvergeMs after its first pass
 * (counted from the start when the first pass itself takes 12 times that), or past
 * DIFF_MAX_PASSES passes, the source is stopped (stop-and-copy) with the bandwidth
 * cap and downtime target lifted, so what is left is copied at once and the copy
 * ends. Bounding the chase, not the first pass, keeps a large guest that does
 * converge from being paused for most of its RAM. True when it had to stop it.
 * The deadline still applies to the whole copy.
 */
async function precopy(qmp: QmpClient, onStop: () => void): Promise<boolean> {
  const started = Date.now();
  const deadline = started + 600_000;
  const bound = diffConvergeMs();
  let forced = false;
  let firstPass = true;
  let firstPassDoneAt: number | undefined;
  for (;;) {
    const info = await qmp.execute("query-migrate", {});
    if (info.status === "completed") return forced;
    if (info.status === "failed" || info.status === "cancelled") {
      throw new ForkdError("qmp_error", `pre-copy capture failed: ${info["error-desc"] ?? info.status}`);
    }
    if (firstPass && info.status === "active") {
      firstPass = false;
      faultPoint("branch.diff-precopy");
    }
    // QEMU syncs the dirty bitmap once at the start and again as each pass over RAM ends.
    const passes = Number((info.ram as { "dirty-sync-count"?: number } | undefined)?.["dirty-sync-count"] ?? 0);
    if (passes >= 2) firstPassDoneAt ??= Date.now();
    const late = firstPassDoneAt !== undefined ? Date.now() - firstPassDoneAt > bound : Date.now() - started > 12 * bound;
    if (!forced && (late || passes > DIFF_MAX_PASSES)) {
      forced = true;
      onStop();
      await qmp.execute("stop", {});
      await qmp.execute("migrate-set-parameters", { "max-bandwidth": 64 * 2 ** 30, "downtime-limit": 600_000 });
    }
    if (Date.now() > deadline) {
      await qmp.execute("migrate_cancel", {}).catch(() => {});
      throw new ForkdError("vm_timeout", "pre-copy capture did not finish within 600000 ms");
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}

async function waitEvent(qmp: QmpClient, seen: QmpEvent[], name: string, timeoutMs = 2000): Promise<QmpEvent | undefined> {
  const already = seen.find((e) => e.event === name);
  if (already) return already;
  return qmp.waitForEvent(name, { timeoutMs }).catch(() => undefined);
}

type MaterializeOpts = {
  tag: string;
  source: { id: string; snapshot: SnapshotInfo };
  capture: CaptureResult;
  streamPath: string;
  work: string;
  stageWork: string;
  startedAt: number;
};

/**
 * Load the capture into a paused QEMU whose RAM is a shared file on shmem, then
 * save its device state with x-ignore-shared: the result is forkable like any
 * warm snapshot. The QEMU used for this never runs the guest (-S).
 */
async function materializeCapture(opts: MaterializeOpts): Promise<SnapshotInfo> {
  const { snapshot } = opts.source;
  const written = await opts.capture.completed;
  const runDir = await makeRunDir(newSandboxId());
  // The materialiser never runs the guest (-S) and needs no network, but keeps the NIC.
  const plan = planRestore(snapshot, {
    runDir,
    memory: { kind: "file", path: path.join(opts.stageWork, "memory.bin"), share: true },
    network: false,
    startPaused: true,
  });
  // The materialiser is temporary: all it takes is given back, newest first, whether it succeeded or not.
  const teardown = new UndoStack();
  teardown.push("remove the materialiser's runtime dir", () => removeRunDir(runDir));
  const stream = fs.openSync(opts.streamPath, "r");
  const closeStream = teardown.push("close the capture stream", () => fs.closeSync(stream));
  try {
    grantToVmm(opts.stageWork, runDir);
    const launched = launchQemu({ plan, dieWithParent: true, inheritFds: [stream] });
    teardown.push("kill the materialiser", () => killAndWait(launched.pid, runDir, launched));
    // QEMU holds its own copy now; closed once here, so the fd number is never closed again after reuse.
    await closeStream();
    faultPoint("branch.materialising");
    const qmp = await QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 10_000 });
    teardown.push("close the materialiser's QMP", () => qmp.close());
    await qmp.execute("migrate-incoming", { uri: "fd:3" });
    await waitForMigration(qmp, 600_000, "loading the capture");
    await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] });
    await migrateToFile(qmp, runDir, path.join(opts.work, "vmstate.bin"), 120_000, "saving the device state");
    await qmp.execute("quit", {}).catch(() => {});
  } catch (err) {
    throw await teardown.rollback(err);
  }
  await teardown.unwindOrThrow("materialising the capture");
  await fsp.rm(opts.streamPath, { force: true });
  // Store only what changed since the source's snapshot, unless the chain is at its limit.
  const depth = (await ancestorsOf(snapshot)).length + 1;
  const diffFrom = depth < MAX_CHAIN_DEPTH ? { memorySha256: snapshot.memorySha256, stagedPath: await stageSnapshot(snapshot) } : undefined;
  return registerSnapshot({
    work: opts.work,
    stageWork: opts.stageWork,
    ...(diffFrom ? { diffFrom } : {}),
    base: {
      tag: opts.tag,
      image: snapshot.image,
      kernelVersion: snapshot.kernelVersion,
      accel: snapshot.accel,
      vcpus: snapshot.vcpus,
      memoryMib: snapshot.memoryMib,
      network: snapshot.network,
      ...(snapshot.machine ? { machine: snapshot.machine } : {}),
      warm: snapshot.warm,
      parent: snapshot.tag,
      branchedFrom: opts.source.id,
      branch: {
        mode: opts.capture.mode,
        pauseMs: opts.capture.pauseMs,
        captureMs: written.captureMs,
        ...(opts.capture.stopAndCopy ? { stopAndCopy: true } : {}),
      },
      timings: { bootMs: 0, warmMs: 0, saveMs: written.captureMs, totalMs: performance.now() - opts.startedAt },
    },
  });
}

type BranchPlan = { tag: string; mode: BranchMode; sourceId: string; snapshot: SnapshotInfo };

/** Check everything that can be checked before the source is touched. */
async function planBranch(sourceId: string, opts: { tag?: string; mode?: string }): Promise<BranchPlan> {
  const row = getSandbox(sourceId, "capture");
  if (!row.tag) throw new ForkdError("bad_request", `sandbox ${sourceId} was not forked from a snapshot, so it cannot be branched`);
  const snapshot = await getSnapshot(row.tag);
  const tag = validateName(opts.tag ?? `${row.tag}-branch-${Date.now().toString(36)}`, "tag");
  await assertSnapshotOp(tag, "create");
  const requested = opts.mode === undefined ? undefined : parseBranchMode(opts.mode);
  if (requested !== undefined && requested !== "live") return { tag, mode: requested, sourceId, snapshot };
  // Live unless its memory is not a staged image (see judgeGuestRam): then diff by default, refused when live was asked for.
  const live = await liveCaptureSupport(sourceId);
  if (live.ok) return { tag, mode: "live", sourceId, snapshot };
  if (requested === "live")
    throw new ForkdError("invalid_state", `live BRANCH is not possible for ${sourceId}: ${live.why}`, { id: sourceId });
  return { tag, mode: "diff", sourceId, snapshot };
}

type BranchOutcome = {
  plan: BranchPlan;
  /** The source's pause. */
  pauseMs: number;
  /** From the call until forks of the tag could start: at once for live (its capture is offered), once registered otherwise. */
  readyMs: number | undefined;
  finish: Promise<SnapshotInfo>;
};

/**
 * Capture now (the source is paused only inside this call) and return as soon
 * as the source runs again; `finish` registers the snapshot (materialising a
 * migration stream first). On any failure nothing is registered and the temp dirs
 * are removed.
 */
async function branchSandbox(plan: BranchPlan): Promise<BranchOutcome> {
  const startedAt = performance.now();
  if (plan.mode === "live") {
    const capture = await captureLive(plan.sourceId, plan.tag, { startedAt });
    return { plan, pauseMs: capture.pauseMs, readyMs: capture.readyAt - startedAt, finish: capture.register() };
  }
  return branchByStream(plan, plan.mode, startedAt);
}

async function branchByStream(plan: BranchPlan, mode: StreamMode, startedAt: number): Promise<BranchOutcome> {
  const { work, stageWork } = await snapshotWorkDirs();
  const streamPath = path.join(stageWork, "capture.stream");
  // Registration moves the work dirs into place; until then a failure removes both.
  const undo = new UndoStack();
  undo.push("remove the snapshot work dir", () => fsp.rm(work, { recursive: true, force: true }));
  undo.push("remove the staging work dir", () => fsp.rm(stageWork, { recursive: true, force: true }));
  let capture: CaptureResult;
  try {
    capture = await captureSandbox(plan.sourceId, mode, streamPath, { branchTag: plan.tag });
  } catch (err) {
    throw await undo.rollback(err);
  }
  const finish = materializeCapture({
    tag: plan.tag,
    source: { id: plan.sourceId, snapshot: plan.snapshot },
    capture,
    streamPath,
    work,
    stageWork,
    startedAt,
  }).then(
    (snapshot) => {
      undo.commit();
      return snapshot;
    },
    async (err: unknown) => {
      throw await undo.rollback(err);
    },
  );
  return { plan, pauseMs: capture.pauseMs, readyMs: undefined, finish };
}

type BranchStatus = {
  tag: string;
  mode: BranchMode;
  status: "writing" | "ready" | "failed";
  pause_ms: number;
  total_ms: number | null;
  memory_bytes: number | null;
  branched_from: string;
  parent: string;
  error?: string;
};

export type StartedBranch = { status: BranchStatus; done: Promise<BranchStatus> };

// BRANCHes of one source run one after another: a second one waits for the first.
const sourceQueues = new Map<string, Promise<unknown>>();

/**
 * Plan, claim the tag (so it shows as `writing`), capture, and hand back as soon
 * as the source runs again. `done` settles when the snapshot is registered
 * (ready) or has failed; either way the registry row says which, and a failure
 * leaves no directory behind.
 */
export async function startBranch(sourceId: string, opts: { tag?: string; mode?: string } = {}): Promise<StartedBranch> {
  const previous = sourceQueues.get(sourceId) ?? Promise.resolve();
  let release!: () => void;
  const mine = new Promise<void>((r) => (release = r));
  const queued = previous.then(() => mine);
  sourceQueues.set(sourceId, queued);
  await previous.catch(() => {});
  const releaseQueue = () => {
    release();
    if (sourceQueues.get(sourceId) === queued) sourceQueues.delete(sourceId);
  };
  const started = performance.now();
  // Given back newest first if the BRANCH fails before its capture is taken, every step even if one throws.
  const undo = new UndoStack();
  undo.push("let the next BRANCH of this source start", releaseQueue);
  let plan: BranchPlan;
  let outcome: BranchOutcome;
  try {
    plan = await planBranch(sourceId, opts);
    const owner = selfIdentity();
    const claimed = branches.claim({
      tag: plan.tag,
      source_id: sourceId,
      mode: plan.mode,
      status: "writing",
      error: null,
      pause_ms: null,
      total_ms: null,
      owner_pid: owner.pid,
      owner_start: owner.start,
      created_at: new Date().toISOString(),
    });
    if (!claimed)
      throw new ForkdError("conflict", `snapshot ${plan.tag} already exists or is being written; pick another tag`, { tag: plan.tag });
    const claimedTag = plan.tag;
    undo.push("drop the claim on the tag", () => branches.remove(claimedTag));
    faultPoint("branch.claimed");
    outcome = await branchSandbox(plan);
  } catch (err) {
    throw await undo.rollback(err);
  }
  // From here `done` reports the outcome in the row and lets the queue go when it settles.
  undo.commit();
  branches.setPause(plan.tag, outcome.pauseMs);
  const base = { tag: plan.tag, mode: plan.mode, pause_ms: outcome.pauseMs, branched_from: sourceId, parent: plan.snapshot.tag };
  const done = outcome.finish
    .then((snapshot): BranchStatus => {
      const total = performance.now() - started;
      branches.finish(plan.tag, { status: "ready", total_ms: total });
      return { ...base, status: "ready", total_ms: total, memory_bytes: snapshot.sizes.memoryAllocatedBytes };
    })
    .catch((err: Error): BranchStatus => {
      branches.finish(plan.tag, { status: "failed", error: err.message, total_ms: performance.now() - started });
      return { ...base, status: "failed", total_ms: null, memory_bytes: null, error: err.message };
    })
    .finally(releaseQueue);
  return { status: { ...base, status: "writing", total_ms: null, memory_bytes: null }, done };
}

/** A BRANCH whose writer died: it will never finish. */
export function branchAbandoned(row: Pick<BranchRow, "status" | "owner_pid" | "owner_start">): boolean {
  return row.status === "writing" && !sameProcess(row.owner_pid, row.owner_start);
}

/**
 * After a crash or restart: a BRANCH whose writer is gone will never finish. Its
 * source is resumed first if the capture may have paused it (the row says so;
 * rows from before that was recorded are checked too), then the BRANCH is marked
 * failed: a crash during recovery leaves the row as it was, to be recovered again.
 */
export async function recoverBranches(): Promise<{ failed: string[]; resumed: string[] }> {
  const failed: string[] = [];
  const resumed: string[] = [];
  for (const row of branches.list()) {
    if (!branchAbandoned(row)) continue;
    let error = "interrupted: the process writing it exited before it was ready";
    if (row.source_paused !== 0) {
      // A source that cannot be reached must not keep the daemon from starting: said in the row instead.
      const outcome = await resumeSource(row.source_id).catch((err: Error) => err);
      if (outcome === true) resumed.push(row.source_id);
      else if (outcome instanceof Error) error += `; ${outcome.message}`;
    }
    branches.finish(row.tag, { status: "failed", error });
    failed.push(row.tag);
  }
  return { failed, resumed };
}

/** States a capture leaves its source in when nobody sends `cont`. */
const PAUSED_BY_CAPTURE = new Set(["paused", "postmigrate", "finish-migrate"]);

/**
 * End whatever migration a dead writer left on the source and run it again if it
 * is paused. True when it had to be resumed. A source that is gone needs nothing.
 */
async function resumeSource(sourceId: string): Promise<boolean> {
  const row = sandboxes.get(sourceId);
  if (!row || !sandboxAllows(sandboxState(row), "resume") || !sandboxAlive(row)) return false;
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(runtimePaths(row.run_dir).qmp, { timeoutMs: 5000 });
    const migration = await qmp.execute("query-migrate", {});
    if (migration.status && !["completed", "failed", "cancelled", "none"].includes(migration.status)) {
      await qmp.execute("migrate_cancel", {});
      const until = Date.now() + 60_000;
      while (Date.now() < until) {
        const { status } = await qmp.execute("query-migrate", {});
        if (status === "cancelled" || status === "failed" || status === "completed") break;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    const { status } = await qmp.execute("query-status", {});
    if (!PAUSED_BY_CAPTURE.has(status)) return false;
    await qmp.execute("cont", {});
    return true;
  } catch (err) {
    throw new ForkdError(
      "qmp_error",
      `could not resume ${sourceId}, left paused by an interrupted BRANCH: ${(err as Error).message}`,
      { id: sourceId },
      { cause: err },
    );
  } finally {
    qmp?.close();
  }
}
