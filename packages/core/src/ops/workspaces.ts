// Workspaces: named, long-lived sandboxes that can be suspended to disk and resumed
// later, across daemon and host restarts. A workspace is a row (SQLite) naming its
// source snapshot, the state snapshot it resumes from and its live sandbox. Suspend
// is a BRANCH (a diff layer on what the sandbox was forked from) then a kill; resume
// forks from the latest state. The chain of states is compacted before it gets deep.
import { randomBytes } from "node:crypto";
import { startBranch } from "../branch/branch.js";
import { ForkdError } from "../common/errors.js";
import { validateName } from "../common/validate.js";
import { forkSandboxes } from "../sandbox/fork.js";
import { getSandbox, killSandbox, sandboxAlive } from "../sandbox/lifecycle.js";
import { getSnapshot } from "../store/snapshots.js";
import { sandboxes, type WorkspaceRow, workspaces } from "../store/state.js";
import { assertWorkspaceAllows } from "../store/state-rules.js";
import { compactSnapshot } from "./compact.js";
import { removeSnapshot } from "./remove-snapshot.js";

/** Names become parts of snapshot tags (`ws-NAME-sN`), which are at most 64 characters. */
const MAX_NAME = 48;
/** States kept as layers before the latest is compacted and the older ones dropped. */
const MAX_STATE_DEPTH = 8;

export type ApiWorkspace = {
  id: string;
  name: string;
  source_snapshot_tag: string;
  current_state_tag?: string;
  status: WorkspaceRow["status"];
  live_sandbox_id?: string;
  created_at_unix: number;
  last_active_unix: number;
  memory_limit_mib: number | null;
};

export function apiWorkspaceView(row: WorkspaceRow): ApiWorkspace {
  return {
    id: row.id,
    name: row.name,
    source_snapshot_tag: row.source_tag,
    ...(row.state_tag ? { current_state_tag: row.state_tag } : {}),
    status: row.status,
    ...(row.sandbox_id && row.status === "running" ? { live_sandbox_id: row.sandbox_id } : {}),
    created_at_unix: Math.floor(row.created_ms / 1000),
    last_active_unix: Math.floor(row.last_active_ms / 1000),
    memory_limit_mib: row.memory_limit_mib,
  };
}

function validateWorkspaceName(name: unknown): string {
  const value = validateName(name, "workspace name");
  if (value.length > MAX_NAME) {
    throw new ForkdError("bad_request", `workspace name '${value}' is ${value.length} characters; the limit is ${MAX_NAME}`);
  }
  return value;
}

/** A workspace by name, its status brought up to date (running with a dead sandbox is stale). */
export function getWorkspace(name: string): WorkspaceRow {
  const row = workspaces.get(validateWorkspaceName(name));
  if (!row) throw new ForkdError("not_found", `no workspace ${name}; GET /v1/workspaces (forkd workspace list) lists them`, { name });
  return reconcileOne(row);
}

function reconcileOne(row: WorkspaceRow): WorkspaceRow {
  if (row.status !== "running" || !row.sandbox_id) return row;
  const live = sandboxes.get(row.sandbox_id);
  if (live && sandboxAlive(live)) return row;
  // Its sandbox is gone (a host reboot, a kill behind its back): resumable from its last state.
  workspaces.update(row.name, { status: "stale", sandbox_id: null });
  return { ...row, status: "stale", sandbox_id: null };
}

export function listWorkspaces(): WorkspaceRow[] {
  return workspaces.list().map(reconcileOne);
}

async function spawnOne(tag: string, memoryLimitMib: number | null): Promise<string> {
  const [child] = await forkSandboxes({ tag, n: 1, ...(memoryLimitMib !== null ? { memoryLimitMib } : {}) });
  if (!child?.ok) {
    throw new ForkdError(
      "vm_start_failed",
      `the workspace's sandbox did not start: ${child && !child.ok ? child.error.message : "unknown"}`,
    );
  }
  return child.id;
}

export async function createWorkspace(opts: { name: string; snapshotTag: string; memoryLimitMib?: number | null }): Promise<WorkspaceRow> {
  const name = validateWorkspaceName(opts.name);
  await getSnapshot(opts.snapshotTag);
  const now = Date.now();
  const row: WorkspaceRow = {
    name,
    id: `ws-${randomBytes(8).toString("hex")}`,
    source_tag: opts.snapshotTag,
    state_tag: null,
    states: "[]",
    status: "suspended",
    sandbox_id: null,
    memory_limit_mib: opts.memoryLimitMib ?? null,
    created_ms: now,
    last_active_ms: now,
  };
  // The row is claimed first: two creates of one name cannot both spawn.
  if (!workspaces.insert(row))
    throw new ForkdError("conflict", `workspace ${name} already exists; DELETE it first or pick another name`, { name });
  try {
    const sandboxId = await spawnOne(opts.snapshotTag, row.memory_limit_mib);
    workspaces.update(name, { status: "running", sandbox_id: sandboxId, last_active_ms: Date.now() });
  } catch (err) {
    workspaces.remove(name);
    throw err;
  }
  return getWorkspace(name);
}

/**
 * Capture the live sandbox as the workspace's new state (a BRANCH: diff by default
 * here, as `diff` asks; live where the caller does not mind), then stop it.
 */
export async function suspendWorkspace(name: string, opts: { diff?: boolean } = {}): Promise<WorkspaceRow> {
  const row = getWorkspace(name);
  assertWorkspaceAllows(row, "suspend");
  if (!row.sandbox_id) throw new ForkdError("internal", `the state table lets workspace ${name} be suspended without a sandbox`, { name });
  getSandbox(row.sandbox_id, "capture");
  const states = JSON.parse(row.states) as string[];
  const tag = `ws-${name}-s${Date.now().toString(36)}`;
  const started = await startBranch(row.sandbox_id, { tag, mode: opts.diff ? "diff" : undefined });
  const done = await started.done;
  if (done.status !== "ready") throw new ForkdError("vm_start_failed", `suspending workspace ${name} failed: ${done.error}`, { name });
  await killSandbox(row.sandbox_id).catch(() => {});
  states.push(tag);
  let current = tag;
  if (states.length >= MAX_STATE_DEPTH) {
    // Past this depth the states are folded into one flat snapshot; the older layers go.
    const flat = `${tag}f`;
    await compactSnapshot(tag, flat);
    const kept = await removeStates(states);
    states.splice(0, states.length, ...kept, flat);
    current = flat;
  }
  workspaces.update(name, {
    status: "suspended",
    sandbox_id: null,
    state_tag: current,
    states: JSON.stringify(states),
    last_active_ms: Date.now(),
  });
  return getWorkspace(name);
}

export async function resumeWorkspace(name: string): Promise<WorkspaceRow> {
  const row = getWorkspace(name);
  assertWorkspaceAllows(row, "resume");
  const sandboxId = await spawnOne(row.state_tag ?? row.source_tag, row.memory_limit_mib);
  workspaces.update(name, { status: "running", sandbox_id: sandboxId, last_active_ms: Date.now() });
  return getWorkspace(name);
}

/** Kill its sandbox and remove its state snapshots (never the source snapshot). */
export async function deleteWorkspace(name: string): Promise<void> {
  const row = getWorkspace(name);
  if (row.sandbox_id) await killSandbox(row.sandbox_id).catch(() => {});
  await removeStates(JSON.parse(row.states) as string[]);
  workspaces.remove(name);
}

/**
 * Remove a workspace's state snapshots, newest first. One that someone branched
 * their own snapshot from stays (it is their base now), and so do the states it
 * needs; those are returned.
 */
async function removeStates(states: string[]): Promise<string[]> {
  const kept: string[] = [];
  for (const tag of [...states].reverse()) {
    try {
      await removeSnapshot(tag, { force: true });
    } catch (err) {
      if (!(err instanceof ForkdError) || (err.code !== "conflict" && err.code !== "snapshot_not_found")) throw err;
      if (err.code === "conflict") kept.unshift(tag);
    }
  }
  return kept;
}
