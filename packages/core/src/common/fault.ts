// Fault injection, for tests only. A crash window is only closed if a test can
// make the process die exactly inside it: FORKD_FAULT=STEP (or STEP@N for the Nth
// time the step is reached, or several joined with commas) makes this process
// SIGKILL itself at that step, the same death as `kill -9` from outside.
// STEP[@N]:fail throws a ForkdError there instead, so one operation fails and the
// process lives on to undo it (a fork's child k failing, for the rollback). Unset,
// every fault point is one string comparison and does nothing. Never set it in
// production: it exists so tests/integration/crash-windows.test.ts can reproduce
// each window and show that start-up recovery finishes or undoes it.
import { ForkdError } from "./errors.js";
import { setting } from "./settings.js";

/** Every step a fault can be injected at, in the order an operation reaches them. */
const FAULT_STEPS = [
  // fork (sandbox/fork.ts restoreChild)
  "fork.row-written",
  "fork.before-launch",
  "fork.launched",
  "fork.before-cont",
  "fork.before-confirm",
  "fork.confirmed",
  // BRANCH (branch/branch.ts; live: branch/live-capture.ts, shared with live fork-to-many)
  "branch.claimed",
  "branch.full-stopped",
  "branch.full-written",
  "branch.diff-precopy",
  "branch.diff-completed",
  "branch.live-stopped",
  "branch.live-captured",
  "branch.materialising",
  // snapshot registration (store/snapshots.ts registerSnapshot, shared by snapshot, BRANCH and compact)
  "snapshot.parent-booted",
  "register.before-commit",
  "register.committed",
  // rmi (ops/remove-snapshot.ts)
  "rmi.unregistered",
  "rmi.files-removed",
  // unpack and pull (hub/)
  "unpack.verified",
  "unpack.registering",
] as const;

export type FaultStep = (typeof FAULT_STEPS)[number];

const reached = new Map<string, number>();

/** SIGKILL this process here (or throw, with :fail) when FORKD_FAULT names this step (test-only; inert when unset). */
export function faultPoint(step: FaultStep): void {
  const wanted = setting("fault");
  if (!wanted) return;
  const count = (reached.get(step) ?? 0) + 1;
  reached.set(step, count);
  for (const item of wanted.split(",")) {
    const [point = "", action] = item.trim().split(":");
    const [name, nth] = point.split("@");
    if (name === step && (nth === undefined || Number(nth) === count)) {
      if (action === "fail") throw new ForkdError("internal", `injected failure at ${step}${nth ? `@${nth}` : ""} (FORKD_FAULT)`);
      // No handler, no cleanup, no flush: the point is to die the way kill -9 kills.
      process.kill(process.pid, "SIGKILL");
    }
  }
}
