// What a fork of N children promises whoever asked for it, in one place for the
// daemon's routes and the CLI without a daemon: reserve what it needs at most (when
// there is a ledger), start every child, and keep all of them or none. A caller
// handed some ids and an error would leak the rest, so on any failure the children
// that did start are killed, what else the fork made is undone, the reservation is
// given back, and the error names the first child that failed.
import { ForkdError } from "../common/errors.js";
import type { AdmissionLedger } from "./admission.js";
import { admitFork } from "./admission-host.js";
import { type ForkChildResult, type ForkOpts, forkSandboxes } from "./fork.js";
import { killSandbox } from "./lifecycle.js";

/** A child that answered its identity call and runs. */
export type StartedChild = Extract<ForkChildResult, { ok: true }>;

/** What admission reserved for the work; given back once. */
type Reservation = { release: () => void };

/** The steps of one fork; the policy decides their order and what is undone when. */
export type ForkSteps<R> = {
  /** Reserve what the work needs at most (admission). Nothing is reserved without it. */
  reserve?: () => Promise<Reservation>;
  /** Start the children, and whatever else the work makes (a live fork's capture). */
  restore: () => Promise<R>;
  /** The children `restore` tried to start, one result each, in order. */
  children: (result: R) => readonly ForkChildResult[];
  /** Children this request already holds (claimed from a hot pool): kept or killed with the rest. */
  held?: readonly string[];
  /** Stop one child that started (kill it; the daemon drops its agent connection too). */
  killChild: (id: string) => Promise<void>;
  /** Undo what the work made besides its children, once they are gone (a live fork drops its capture). */
  undo?: (result: R) => Promise<void>;
};

/**
 * Run `steps` all or nothing. On success the reservation is still held and
 * `release` gives it back (a fork releases at once: its children now count as
 * alive; a live fork holds it until its capture is registered). On failure nothing
 * the steps made is left running and the reservation is already released.
 */
export async function allOrNothing<R>(steps: ForkSteps<R>): Promise<{ result: R; release: () => void }> {
  const held = steps.held ?? [];
  let reservation: Reservation | undefined;
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    reservation?.release();
  };
  let result: R;
  try {
    reservation = await steps.reserve?.();
    result = await steps.restore();
  } catch (err) {
    // Refused or failed before any child of its own started: what this request held goes too.
    await killAll(held, steps.killChild);
    release();
    throw err;
  }
  const children = steps.children(result);
  const failed = children.filter((c) => !c.ok);
  if (failed.length === 0) return { result, release };
  // Killed before the reservation is given back: until then they still hold what it counted.
  const rollback = await killAll([...held, ...children.filter((c) => c.ok).map((c) => c.id)], steps.killChild);
  if (steps.undo) {
    try {
      await steps.undo(result);
    } catch (err) {
      rollback.push({ message: `undoing the fork failed: ${(err as Error).message}` });
    }
  }
  release();
  throw forkFailedError(failed, held.length + children.length, rollback);
}

/** Kill each child in turn; one that will not die does not stop the others. Returns what failed. */
async function killAll(ids: readonly string[], killChild: (id: string) => Promise<void>): Promise<{ id?: string; message: string }[]> {
  const failures: { id?: string; message: string }[] = [];
  for (const id of ids) {
    try {
      await killChild(id);
    } catch (err) {
      failures.push({ id, message: (err as Error).message });
    }
  }
  return failures;
}

/** The error a fork leaves with: how many of how many failed, the first cause, every failure, and any rollback step that failed. */
function forkFailedError(
  failed: readonly ForkChildResult[],
  total: number,
  rollback: readonly { id?: string; message: string }[] = [],
): ForkdError {
  const failures = failed.flatMap((c) => (c.ok ? [] : [{ id: c.id, ...c.error }]));
  return new ForkdError(
    "vm_start_failed",
    `${failures.length} of ${total} children could not be restored, so none were kept: ${failures[0]?.message ?? "no cause reported"}`,
    { failures, ...(rollback.length ? { rollback_failures: rollback } : {}) },
  );
}

export type ForkAllOrNothingOpts = ForkOpts & {
  /** The daemon's admission ledger: what the fork needs at most is reserved there first (a 503 when short). */
  admission?: AdmissionLedger;
  /** Children this request already holds (claimed from a hot pool): killed too if the fork fails. */
  held?: readonly string[];
  /** Wraps the restore (the daemon's hot pools step aside while a user's fork is in flight). */
  around?: <T>(work: () => Promise<T>) => Promise<T>;
  /** How a started child is stopped on rollback; killSandbox unless the caller holds more (an agent connection). */
  killChild?: (id: string) => Promise<void>;
};

/** Fork N children from a snapshot, all or nothing: every child started, or an error and none left. */
export async function forkAllOrNothing(opts: ForkAllOrNothingOpts): Promise<StartedChild[]> {
  const { admission, held, around, killChild, ...forkOpts } = opts;
  const { result, release } = await allOrNothing({
    ...(admission
      ? { reserve: () => admitFork(admission, { tag: forkOpts.tag, n: forkOpts.n, memoryLimitMib: forkOpts.memoryLimitMib }) }
      : {}),
    restore: () => (around ? around(() => forkSandboxes(forkOpts)) : forkSandboxes(forkOpts)),
    children: (results) => results,
    ...(held ? { held } : {}),
    killChild: killChild ?? killSandbox,
  });
  // Its children now count as alive sandboxes and show in host memory: the reservation has done its work.
  release();
  return result.filter((c): c is StartedChild => c.ok);
}
