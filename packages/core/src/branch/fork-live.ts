// Live fork-to-many: N children of a running sandbox in one call, the source paused
// only while the pages it wrote are copied (branch/live-capture.ts, the same capture
// as live BRANCH). The new children map the staged image the source maps and load
// those pages from their device-state stream: no whole-RAM migration and no
// materialising QEMU stand between the call and the children. The capture is
// registered as an ordinary snapshot (a diff layer) after the children answered,
// off their path.
import { ForkdError } from "../common/errors.js";
import { validateName } from "../common/validate.js";
import type { AgentClient } from "../guest/agent-client.js";
import type { AdmissionLedger } from "../sandbox/admission.js";
import { admitLiveFork } from "../sandbox/admission-host.js";
import { type ForkChildResult, forkSandboxes, validateForkCount } from "../sandbox/fork.js";
import { allOrNothing, type StartedChild } from "../sandbox/fork-policy.js";
import { getSandbox, killSandbox } from "../sandbox/lifecycle.js";
import { assertSnapshotOp, type SnapshotInfo } from "../store/snapshots.js";
import { branches } from "../store/state.js";
import { selfIdentity } from "../vmm/process.js";
import { captureLive, mappedImage } from "./live-capture.js";

type LiveForkOpts = {
  n: number;
  /** The snapshot the capture is registered as; default SOURCE_TAG-live-BASE36. */
  tag?: string;
  ttlMs?: number;
  metadata?: Record<string, string>;
  concurrency?: number;
  keepAgent?: (id: string, agent: AgentClient) => void;
  onChild?: (result: ForkChildResult) => void;
};

type LiveFork = {
  tag: string;
  sourceId: string;
  /** The source's pause, QEMU's STOP to RESUME. */
  pauseMs: number;
  /** From the call until the capture could be forked from. */
  captureReadyMs: number;
  /** When it could (performance.now()), for callers timing from earlier than the call. */
  captureReadyAt: number;
  capturedPages: number;
  children: ForkChildResult[];
  /** Register the capture as snapshot `tag` (a diff layer on the source's image); call once the children are up. */
  register: () => Promise<SnapshotInfo>;
  /** Drop the capture instead (the children failed and were killed). */
  discard: () => Promise<void>;
};

async function forkLive(sourceId: string, opts: LiveForkOpts): Promise<LiveFork> {
  const started = performance.now();
  const n = validateForkCount(opts.n);
  const row = getSandbox(sourceId, "capture");
  if (!row.tag) throw new ForkdError("bad_request", `sandbox ${sourceId} was not forked from a snapshot, so it cannot be forked live`);
  const tag = validateName(opts.tag ?? `${row.tag}-live-${Date.now().toString(36)}`, "tag");
  await assertSnapshotOp(tag, "create");
  // Checked before the tag is claimed: a source that cannot be captured live leaves no row.
  const source = await mappedImage(sourceId);
  const owner = selfIdentity();
  const claimed = branches.claim({
    tag,
    source_id: sourceId,
    mode: "live",
    status: "writing",
    error: null,
    pause_ms: null,
    total_ms: null,
    owner_pid: owner.pid,
    owner_start: owner.start,
    created_at: new Date().toISOString(),
  });
  if (!claimed) throw new ForkdError("conflict", `snapshot ${tag} already exists or is being written; pick another tag`, { tag });
  let capture: Awaited<ReturnType<typeof captureLive>>;
  try {
    capture = await captureLive(sourceId, tag, { startedAt: started, source });
  } catch (err) {
    branches.finish(tag, { status: "failed", error: (err as Error).message });
    throw err;
  }
  branches.setPause(tag, capture.pauseMs);
  const captureReadyAt = capture.readyAt;
  const captureReadyMs = captureReadyAt - started;
  let children: ForkChildResult[];
  try {
    children = await forkSandboxes({
      tag,
      n,
      from: capture.from,
      ...(opts.ttlMs !== undefined ? { ttlMs: opts.ttlMs } : {}),
      ...(opts.metadata ? { metadata: opts.metadata } : {}),
      ...(opts.concurrency !== undefined ? { concurrency: opts.concurrency } : {}),
      ...(opts.keepAgent ? { keepAgent: opts.keepAgent } : {}),
      ...(opts.onChild ? { onChild: opts.onChild } : {}),
    });
  } catch (err) {
    await capture.discard();
    branches.finish(tag, { status: "failed", error: (err as Error).message });
    throw err;
  }
  const register = async (): Promise<SnapshotInfo> => {
    try {
      const info = await capture.register();
      branches.finish(tag, { status: "ready", total_ms: performance.now() - started });
      return info;
    } catch (err) {
      branches.finish(tag, { status: "failed", error: (err as Error).message });
      throw err;
    }
  };
  return {
    tag,
    sourceId,
    pauseMs: capture.pauseMs,
    captureReadyMs,
    captureReadyAt,
    capturedPages: capture.capturedPages,
    children,
    register,
    discard: async () => {
      await capture.discard();
      branches.remove(tag);
    },
  };
}

export type LiveForkAllOrNothingOpts = LiveForkOpts & {
  /** The daemon's admission ledger: the children and the capture are reserved there first (a 503 when short). */
  admission?: AdmissionLedger;
  /** Wraps the fork (the daemon's hot pools step aside while a user's fork is in flight). */
  around?: <T>(work: () => Promise<T>) => Promise<T>;
  /** How a started child is stopped on rollback; killSandbox unless the caller holds more (an agent connection). */
  killChild?: (id: string) => Promise<void>;
};

/** A live fork every child of which started; `register` also gives back what admission reserved. */
export type StartedLiveFork = Omit<LiveFork, "children" | "discard"> & { children: StartedChild[] };

/**
 * A live fork-to-many, all or nothing (sandbox/fork-policy.ts): every child
 * started, or an error with none left and the capture dropped. What admission
 * reserved stays held until `register` settles: the capture's memory image is on
 * shmem until then.
 */
export async function forkLiveAllOrNothing(sourceId: string, opts: LiveForkAllOrNothingOpts): Promise<StartedLiveFork> {
  const { admission, around, killChild, ...liveOpts } = opts;
  const n = validateForkCount(liveOpts.n);
  const { result, release } = await allOrNothing({
    ...(admission ? { reserve: () => admitLiveFork(admission, { n, guestMemoryMib: getSandbox(sourceId, "capture").memory_mib }) } : {}),
    restore: () => (around ? around(() => forkLive(sourceId, liveOpts)) : forkLive(sourceId, liveOpts)),
    children: (live) => live.children,
    killChild: killChild ?? killSandbox,
    undo: (live) => live.discard(),
  });
  const { discard: _discard, register, ...rest } = result;
  return {
    ...rest,
    children: result.children.filter((c): c is StartedChild => c.ok),
    register: () => register().finally(release),
  };
}
