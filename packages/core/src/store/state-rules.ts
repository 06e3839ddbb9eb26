// What an action may do to a sandbox or a snapshot in each state it can be in: one
// table per resource, every cell filled in, consulted by every action that depends
// on the state. A new state or a new action is a type error here until the table
// says what happens, instead of a comparison added (or forgotten) in one more file.
import { type ErrorCode, ForkdError } from "../common/errors.js";

/** Allowed, or refused with the code to answer and what the caller can do about it. */
export type Decision = { allow: true } | { allow: false; code: ErrorCode; todo: string };

const ALLOW: Decision = { allow: true };
const refuse = (code: ErrorCode, todo: string): Decision => ({ allow: false, code, todo });

// --- sandboxes ---

/**
 * starting: its row exists (the intent) but it has not answered its identity call;
 * it is its starter's until then, and start-up recovery's if the starter died.
 * running: it answered. unhealthy: running, but its guest broke the agent protocol
 * (the health column; never cleared, only a kill ends it).
 */
export const SANDBOX_STATES = ["starting", "running", "unhealthy"] as const;
export type SandboxState = (typeof SANDBOX_STATES)[number];

export const SANDBOX_OPS = ["show", "list", "connect", "capture", "kill", "expire", "claim", "resume"] as const;
export type SandboxOp = (typeof SANDBOX_OPS)[number];

/** How each operation reads in a refusal: "sandbox X is still starting, so it cannot <verb>". */
const SANDBOX_OP_VERBS: Record<SandboxOp, string> = {
  show: "be used yet",
  list: "be listed",
  connect: "take agent calls (exec, files, eval, processes)",
  capture: "be captured (BRANCH, live fork)",
  kill: "be killed",
  expire: "expire",
  claim: "be handed out from its pool",
  resume: "be resumed",
};

export const SANDBOX_RULES: Record<SandboxState, Record<SandboxOp, Decision>> = {
  starting: {
    // Not a sandbox until it answered: to everyone but its starter it does not exist yet.
    show: refuse("sandbox_not_found", "it is listed once it answers; its fork reports its id"),
    list: refuse("sandbox_not_found", "it is listed once it answers"),
    connect: refuse("sandbox_not_found", "wait until its fork returns it"),
    capture: refuse("sandbox_not_found", "wait until its fork returns it"),
    // Killing one undoes its start (sandbox/lifecycle.ts abandonStartingSandbox).
    kill: ALLOW,
    // Its starter finishes or undoes it; its time limit applies once it runs.
    expire: refuse("invalid_state", "its time limit applies once it answers"),
    claim: refuse("invalid_state", "a pool hands out only children that answered"),
    // No BRANCH can have paused a sandbox that never ran.
    resume: refuse("invalid_state", "it never ran, so nothing paused it"),
  },
  running: {
    show: ALLOW,
    list: ALLOW,
    connect: ALLOW,
    capture: ALLOW,
    kill: ALLOW,
    expire: ALLOW,
    claim: ALLOW,
    resume: ALLOW,
  },
  unhealthy: {
    // Shown and listed with its health, so the user sees why it refuses calls.
    show: ALLOW,
    list: ALLOW,
    // Reconnecting would only hand the same hostile guest another channel.
    connect: refuse("invalid_state", "its agent is no longer trusted: kill it"),
    // A capture talks to QEMU, never to the guest, and every guest is untrusted anyway.
    capture: ALLOW,
    kill: ALLOW,
    expire: ALLOW,
    // Nobody asked for a broken child: it stays out of hand-outs until the pool drains it.
    claim: refuse("invalid_state", "a pool never hands out a child whose guest broke the agent protocol"),
    // A source an interrupted BRANCH left paused runs again whatever its guest did.
    resume: ALLOW,
  },
};

/** The state a sandbox row is in, from its state and health columns. */
export function sandboxState(row: { state: "starting" | "running"; health?: "unhealthy" | null }): SandboxState {
  if (row.state === "starting") return "starting";
  return row.health === "unhealthy" ? "unhealthy" : "running";
}

export function sandboxAllows(state: SandboxState, op: SandboxOp): boolean {
  return SANDBOX_RULES[state][op].allow;
}

/**
 * Throw the table's refusal for `op` on this sandbox, naming its state, the
 * operation and what to do; return quietly when the table allows it.
 */
export function assertSandboxAllows(
  row: { id: string; state: "starting" | "running"; health?: "unhealthy" | null; health_reason?: string | null },
  op: SandboxOp,
): void {
  const state = sandboxState(row);
  const decision = SANDBOX_RULES[state][op];
  if (decision.allow) return;
  const why =
    state === "unhealthy"
      ? `is unhealthy (${row.health_reason ?? "its guest broke the agent protocol"})`
      : state === "starting"
        ? "is still starting"
        : `is ${state}`;
  throw new ForkdError(decision.code, `sandbox ${row.id} ${why}, so it cannot ${SANDBOX_OP_VERBS[op]}: ${decision.todo}`, {
    id: row.id,
    state,
    op,
    ...(state === "unhealthy" ? { health: "unhealthy", health_reason: row.health_reason ?? null } : {}),
  });
}

/** Each state as a condition on the sandboxes table's columns, for queries that must select atomically. */
const SANDBOX_STATE_SQL: Record<SandboxState, string> = {
  starting: "state = 'starting'",
  running: "(state = 'running' AND health IS NULL)",
  unhealthy: "(state = 'running' AND health IS NOT NULL)",
};

/** A WHERE condition matching exactly the rows whose state allows `op` (built from constants only). */
export function sandboxRowsAllowing(op: SandboxOp): string {
  const states = SANDBOX_STATES.filter((s) => sandboxAllows(s, op));
  return states.length === 0 ? "0" : `(${states.map((s) => SANDBOX_STATE_SQL[s]).join(" OR ")})`;
}

// --- snapshots ---

/**
 * absent: no manifest and no BRANCH row. writing: a BRANCH (or live fork) claimed
 * the tag and is writing it. ready: its manifest is committed (the registry's
 * commit point). failed: its BRANCH failed; the row keeps why, nothing is registered.
 */
export const SNAPSHOT_STATES = ["absent", "writing", "ready", "failed"] as const;
export type SnapshotState = (typeof SNAPSHOT_STATES)[number];

/** use: read a registered snapshot (fork from it, stage, pool, pack, push, rmi). create: claim its tag for a new one. */
export const SNAPSHOT_OPS = ["use", "create"] as const;
export type SnapshotOp = (typeof SNAPSHOT_OPS)[number];

const SNAPSHOT_OP_VERBS: Record<SnapshotOp, string> = {
  use: "be used",
  create: "be created again",
};

export const SNAPSHOT_RULES: Record<SnapshotState, Record<SnapshotOp, Decision>> = {
  absent: {
    use: refuse("snapshot_not_found", "`forkd images` lists them"),
    create: ALLOW,
  },
  writing: {
    use: refuse("conflict", "wait until its status is ready"),
    create: refuse("conflict", "pick another tag"),
  },
  ready: {
    use: ALLOW,
    create: refuse("conflict", "remove it with `forkd rmi` or pick another tag"),
  },
  failed: {
    use: refuse("snapshot_not_found", "it was never registered; BRANCH again to the same tag"),
    // A failed BRANCH leaves only its row: a new writer takes the tag over.
    create: ALLOW,
  },
};

export function snapshotAllows(state: SnapshotState, op: SnapshotOp): boolean {
  return SNAPSHOT_RULES[state][op].allow;
}

/** The words for each state in a refusal, with what the BRANCH row adds. */
function snapshotWhy(state: Exclude<SnapshotState, "absent">, branch?: { source_id?: string; error?: string | null }): string {
  switch (state) {
    case "writing":
      return `is still being written${branch?.source_id ? ` by a BRANCH of ${branch.source_id}` : ""}`;
    case "ready":
      return "already exists";
    case "failed":
      return `does not exist: its BRANCH failed (${branch?.error ?? "unknown reason"})`;
  }
}

/** Throw the table's refusal for `op` on snapshot `tag`; return quietly when it is allowed. */
export function assertSnapshotAllows(
  tag: string,
  state: SnapshotState,
  op: SnapshotOp,
  branch?: { source_id?: string; error?: string | null },
): void {
  const decision = SNAPSHOT_RULES[state][op];
  if (decision.allow) return;
  throw new ForkdError(
    decision.code,
    state === "absent"
      ? `no snapshot ${tag}; ${decision.todo}`
      : `snapshot ${tag} ${snapshotWhy(state, branch)}, so it cannot ${SNAPSHOT_OP_VERBS[op]}: ${decision.todo}`,
    {
      tag,
      ...(state === "absent" ? {} : { status: state }),
      op,
    },
  );
}

/** The BRANCH row statuses a new writer may take a tag over from (branches.claim, atomically). */
export function claimableBranchStatuses(): SnapshotState[] {
  return (["writing", "ready", "failed"] as const).filter((s) => snapshotAllows(s, "create"));
}

// --- workspaces ---

/** running: its sandbox is live. suspended: its state is a snapshot, no sandbox. stale: it was running and its sandbox died. */
export const WORKSPACE_STATES = ["running", "suspended", "stale"] as const;
export type WorkspaceState = (typeof WORKSPACE_STATES)[number];

export const WORKSPACE_OPS = ["suspend", "resume"] as const;
export type WorkspaceOp = (typeof WORKSPACE_OPS)[number];

// Refused with 400 (bad_request), as before this table: asking to suspend a suspended workspace is a wrong request, not a race.
export const WORKSPACE_RULES: Record<WorkspaceState, Record<WorkspaceOp, Decision>> = {
  running: {
    suspend: ALLOW,
    resume: refuse("bad_request", "not suspended: it runs in its sandbox already (suspend it first)"),
  },
  suspended: {
    suspend: refuse("bad_request", "not running: suspend needs its live sandbox (resume it first)"),
    resume: ALLOW,
  },
  stale: {
    suspend: refuse("bad_request", "not running: its sandbox is gone, so there is nothing to capture (resume it first)"),
    // From its last suspended state (or its source): what it did since then died with its sandbox.
    resume: ALLOW,
  },
};

/** A running workspace without a sandbox has nothing live to act on: it is stale. */
export function workspaceState(row: { status: WorkspaceState; sandbox_id: string | null }): WorkspaceState {
  return row.status === "running" && !row.sandbox_id ? "stale" : row.status;
}

export function workspaceAllows(state: WorkspaceState, op: WorkspaceOp): boolean {
  return WORKSPACE_RULES[state][op].allow;
}

/** Throw the table's refusal for `op` on this workspace; return quietly when it is allowed. */
export function assertWorkspaceAllows(row: { name: string; status: WorkspaceState; sandbox_id: string | null }, op: WorkspaceOp): void {
  const state = workspaceState(row);
  const decision = WORKSPACE_RULES[state][op];
  if (decision.allow) return;
  throw new ForkdError(decision.code, `workspace ${row.name} is ${state}, ${decision.todo}`, {
    name: row.name,
    status: state,
    op,
    ...(row.sandbox_id ? { sandbox_id: row.sandbox_id } : {}),
  });
}
