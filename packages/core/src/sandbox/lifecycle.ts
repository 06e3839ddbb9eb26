// Sandboxes after their birth: find them from any process (SQLite), check they live, tear them down.
import { inBackground } from "../common/background.js";
import { ForkdError } from "../common/errors.js";
import { isAlive } from "../common/pid.js";
import { validateSandboxId } from "../common/validate.js";
import { AgentClient } from "../guest/agent-client.js";
import { waitForAgent } from "../guest/agent-wait.js";
import { removeSandboxEgress } from "../net/netns.js";
import { type SandboxRow, sandboxes } from "../store/state.js";
import { assertSandboxAllows, type SandboxOp, sandboxAllows, sandboxState } from "../store/state-rules.js";
import { runtimePaths } from "../vmm/plan.js";
import { findOurQemus, isOurVmm, killAndWait, processStartTime, removeRunDir, runDirUid, sameProcess } from "../vmm/process.js";
import { QmpClient } from "../vmm/qmp.js";
import { removeCgroup, sandboxCgroupDirs } from "./cgroup.js";

/**
 * Alive and still the same process: pids are reused, so the start time (which the
 * kernel keeps) and the VMM's uid (which the root launcher set and the VMM cannot
 * change) must match too. Not the command line: a VMM can rewrite its own.
 */
export function sandboxAlive(row: Pick<SandboxRow, "pid" | "pid_start" | "run_dir" | "vmm_uid">): boolean {
  return (
    isAlive(row.pid) && processStartTime(row.pid) === row.pid_start && isOurVmm(row.pid, row.run_dir, row.vmm_uid ?? runDirUid(row.run_dir))
  );
}

export type SandboxInfo = SandboxRow & { alive: boolean };

/**
 * A sandbox by id for `op` (what the state table in store/state-rules.ts allows in its
 * state), or a clear not-found naming `forkd ls`. Dead ones are reaped on the way.
 */
export function getSandbox(id: string, op: SandboxOp = "show"): SandboxInfo {
  validateSandboxId(id);
  const row = sandboxes.get(id);
  if (!row) throw new ForkdError("sandbox_not_found", `no sandbox ${id}; \`forkd ls\` lists them`, { id });
  // First whether it may be looked at at all: a row still starting has no VMM recorded yet and must not be judged dead.
  assertSandboxAllows(row, "show");
  const alive = sandboxAlive(row);
  if (!alive) {
    inBackground(`reaping sandbox ${id}`, reapSandbox(row));
    throw new ForkdError("sandbox_not_found", `sandbox ${id} is no longer running (its VMM exited); it has been removed`, { id });
  }
  assertSandboxAllows(row, op);
  return { ...row, alive };
}

export function listSandboxes(): SandboxInfo[] {
  return sandboxes
    .list()
    .filter((row) => sandboxAllows(sandboxState(row), "list"))
    .map((row) => ({ ...row, alive: sandboxAlive(row) }));
}

/** A row still being started whose starter is alive: hands off, it is not abandoned. */
export function startingOwned(row: SandboxRow): boolean {
  return sandboxState(row) === "starting" && sameProcess(row.owner_pid, row.owner_start);
}

/**
 * Undo a start that will never finish (its starter died, or it is being killed):
 * its VMM, found by the recorded pid or, if it was launched but not yet recorded,
 * by its runtime dir, is killed; then everything else of it is reaped.
 */
export async function abandonStartingSandbox(row: SandboxRow): Promise<void> {
  const pids = new Set(findOurQemus(row.run_dir));
  if (row.pid > 0 && processStartTime(row.pid) === row.pid_start && isOurVmm(row.pid, row.run_dir, row.vmm_uid ?? runDirUid(row.run_dir)))
    pids.add(row.pid);
  for (const pid of pids) await killAndWait(pid, row.run_dir, undefined, 200);
  // The group may have been made and the pid moved in before the row recorded it.
  await removeCgroup(row.cgroup ?? sandboxCgroupDirs(row.id));
  await reapSandbox(row);
}

/**
 * Connect to a sandbox's agent. One client at a time: the chardev queues a second until the first leaves.
 * A sandbox whose guest broke the protocol is refused at once: reconnecting would only
 * hand the same hostile guest another channel. `onUnhealthy` hears of a violation on this one.
 */
export async function connectSandbox(
  id: string,
  timeoutMs = 30_000,
  onUnhealthy?: (id: string, reason: string) => void,
): Promise<AgentClient> {
  // Refused for an unhealthy sandbox: reconnecting would only hand the same hostile guest another channel.
  const row = getSandbox(id, "connect");
  const socketPath = runtimePaths(row.run_dir).agent;
  const agent = await AgentClient.connect(socketPath, { timeoutMs });
  watchAgentHealth(id, agent, onUnhealthy);
  return waitForAgent(socketPath, timeoutMs, row.run_dir, undefined, undefined, agent);
}

/** Record a protocol violation on the sandbox's row when its agent channel reports one. */
export function watchAgentHealth(id: string, agent: AgentClient, onUnhealthy?: (id: string, reason: string) => void): void {
  agent.onViolation((reason) => {
    const clean = reason.replace(/[^\x20-\x7e]/g, "?").slice(0, 500);
    try {
      sandboxes.markUnhealthy(id, clean);
    } catch {
      // The state file being busy must not turn a guest's misbehaviour into ours.
    }
    onUnhealthy?.(id, clean);
  });
}

export async function killSandbox(id: string): Promise<void> {
  validateSandboxId(id);
  const row = sandboxes.get(id);
  if (!row) throw new ForkdError("sandbox_not_found", `no sandbox ${id}; \`forkd ls\` lists them`, { id });
  assertSandboxAllows(row, "kill");
  // Killing one still starting undoes its start instead: its VMM may not be recorded yet.
  if (sandboxState(row) === "starting") {
    await abandonStartingSandbox(row);
    return;
  }
  if (sandboxAlive(row)) {
    try {
      const qmp = await QmpClient.connect(runtimePaths(row.run_dir).qmp, { timeoutMs: 2000 });
      await qmp.execute("quit", {}, { timeoutMs: 2000 }).catch(() => {});
      qmp.close();
    } catch {
      // fall through to signals
    }
    await killAndWait(row.pid, row.run_dir);
  }
  await reapSandbox(row);
}

export async function reapSandbox(row: SandboxRow): Promise<void> {
  await removeCgroup(row.cgroup);
  // Before the uid is freed with the runtime dir: its next holder must not inherit these rules.
  await removeSandboxEgress(row.vmm_uid ?? runDirUid(row.run_dir));
  await removeRunDir(row.run_dir);
  sandboxes.remove(row.id);
}

/** Kill sandboxes whose time limit has passed. */
export async function expireSandboxes(nowMs = Date.now()): Promise<string[]> {
  const expired = sandboxes.expired(nowMs);
  for (const row of expired) await killSandbox(row.id).catch(() => {});
  return expired.map((r) => r.id);
}
