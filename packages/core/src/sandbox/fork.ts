// Fork: restore N children copy-on-write from a snapshot, each its own QEMU.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { UndoStack } from "../common/undo.js";
import { AgentClient } from "../guest/agent-client.js";
import { waitForAgent } from "../guest/agent-wait.js";
import { applySandboxEgress, egressPolicyEnabled, ensureEgressNamespace, removeSandboxEgress } from "../net/netns.js";
import { type EgressPolicy, isEmptyPolicy, parseEgressPolicy, policyView } from "../net/policy.js";
import { stageSnapshot } from "../store/chains.js";
import { pooledRows } from "../store/pools.js";
import { getSnapshot, type SnapshotInfo } from "../store/snapshots.js";
import { holdStaged, sealedSource, stageKey } from "../store/staging.js";
import { sandboxes } from "../store/state.js";
import { runtimePaths, type VmPlan } from "../vmm/plan.js";
import {
  keepLogs,
  killAndWait,
  launchQemu,
  makeRunDir,
  newSandboxId,
  processStartTime,
  qemuLogTail,
  removeRunDir,
  runDirUid,
  saveConsole,
  selfIdentity,
} from "../vmm/process.js";
import { QmpClient } from "../vmm/qmp.js";
import { limitSandbox, removeCgroup, validateCpuLimit } from "./cgroup.js";
import { type CaptureSource, useOfferedCapture } from "./offered-captures.js";
import { setSandboxPriority } from "./priority.js";

export const MAX_FORK = 1000;

export type ForkOpts = {
  tag: string;
  n: number;
  memoryLimitMib?: number;
  /** CPUs each child may use (a cgroup quota; fractions allowed); its vCPUs by default. */
  cpuLimit?: number;
  network?: boolean;
  /** Exceptions to the default egress deny (private CIDRs, say): IP, CIDR, IP:PORT, [v6]:PORT, CIDR:PORT. */
  allowOut?: string[];
  /** Destinations the default would allow that this sandbox may not reach; allow_out wins where both match. */
  denyOut?: string[];
  /** Restores in flight at once. */
  concurrency?: number;
  /** Each child must answer its first ping within this. */
  readyTimeoutMs?: number;
  onChild?: (result: ForkChildResult) => void;
  /** Kill each child this long after it started (E2B's sandbox timeout); none by default. */
  ttlMs?: number;
  metadata?: Record<string, string>;
  /** Keep the child's agent connection open and hand it over (the daemon pools them); closed otherwise. */
  keepAgent?: (id: string, agent: AgentClient) => void;
  signal?: AbortSignal;
  /** Restore into this snapshot tag's hot pool: the rows are marked pooled (hidden from users) until claimed. */
  pool?: string;
  /** Restore at background CPU priority (a pool refill nobody waits on): users' work wins every contended CPU. */
  background?: boolean;
  /** Restore from a capture not registered yet (live fork-to-many): its record, its memory image, its device state. */
  from?: CaptureSource;
};

type ForkTimings = {
  /** spawn → QMP greeting: the VMM process is up. */
  vmmStartMs: number;
  /** QMP up → guest running again (device state loaded). */
  restoreMs: number;
  /** guest running → first agent answer, which is the identity call (hostname, entropy, clock). */
  firstAnswerMs: number;
  totalMs: number;
};

export type ForkChildResult =
  | { ok: true; id: string; pid: number; timings: ForkTimings }
  | { ok: false; id: string; error: { code: string; message: string; console?: string } };

/**
 * Restores in flight at once when the caller names none, from the host's cores. A
 * restore is mostly CPU (QEMU starting, device state loading, the guest's first
 * answer) between short waits (QMP round trips), so a few per core keep every core
 * busy without queueing each child behind many others. On 2 cores under TCG (20 and
 * 100 children): 1 per core left cores idle (131 ms of wall per child), 4 per core was
 * fastest (75-97 ms), 8 per core slower again (97 ms, and each child 3x longer in flight).
 */
export function defaultRestoreConcurrency(cores = os.availableParallelism()): number {
  return Math.max(2, Math.min(64, cores * 4));
}

export function validateForkCount(n: unknown): number {
  if (typeof n !== "number" || !Number.isInteger(n) || n < 1 || n > MAX_FORK) {
    throw new ForkdError("bad_request", `the number of children must be a whole number from 1 to ${MAX_FORK}, got ${String(n)}`);
  }
  return n;
}

export async function forkSandboxes(opts: ForkOpts): Promise<ForkChildResult[]> {
  const n = validateForkCount(opts.n);
  if (opts.memoryLimitMib !== undefined && (!Number.isInteger(opts.memoryLimitMib) || opts.memoryLimitMib < 64)) {
    throw new ForkdError("bad_request", `--memory-limit-mib must be a whole number of at least 64, got ${opts.memoryLimitMib}`);
  }
  if (opts.cpuLimit !== undefined) validateCpuLimit(opts.cpuLimit);
  if (opts.ttlMs !== undefined && (!Number.isInteger(opts.ttlMs) || opts.ttlMs < 1000 || opts.ttlMs > 30 * 24 * 3_600_000)) {
    throw new ForkdError("bad_request", `the sandbox timeout must be a whole number of ms from 1000 to 30 days, got ${opts.ttlMs}`);
  }
  if (opts.metadata !== undefined && JSON.stringify(opts.metadata).length > 16_384) {
    throw new ForkdError("too_large", "metadata is limited to 16 KiB of JSON");
  }
  const policy = parseEgressPolicy({ allowOut: opts.allowOut, denyOut: opts.denyOut });
  if (!isEmptyPolicy(policy) && !egressPolicyEnabled()) {
    throw new ForkdError(
      "not_supported",
      "allow_out/deny_out need the network egress policy, which is off here (FORKD_NETWORK_POLICY=off / --network-policy off)",
    );
  }
  // A live BRANCH still being registered is forked from its capture (held until the children loaded it).
  const offered = opts.from ? undefined : useOfferedCapture(opts.tag);
  const from = opts.from ?? offered?.source;
  try {
    const snapshot = from?.snapshot ?? (await getSnapshot(opts.tag));
    // Held from before staging until every child has mapped it: another fork's staging must not evict it meanwhile.
    const unhold = holdStaged(stageKey(snapshot));
    try {
      return await forkStaged(snapshot, n, { ...opts, ...(from ? { from } : {}) }, policy);
    } finally {
      unhold();
    }
  } finally {
    offered?.release();
  }
}

async function forkStaged(snapshot: SnapshotInfo, n: number, opts: ForkOpts, policy: EgressPolicy): Promise<ForkChildResult[]> {
  const stagedFile = opts.from?.memoryPath ?? (await stageSnapshot(snapshot));
  // Children map the staged image's sealed memfd copy, which no VMM can write.
  const memory: VmPlan["memory"] = { kind: "sealed", source: await sealedSource(stagedFile) };
  const netns = await ensureEgressNamespace();
  const concurrency = Math.max(1, Math.min(opts.concurrency ?? defaultRestoreConcurrency(), n));
  const results: ForkChildResult[] = new Array(n);
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const index = next++;
      opts.signal?.throwIfAborted();
      const result = await restoreChild(snapshot, memory, opts, { policy, netns });
      results[index] = result;
      opts.onChild?.(result);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return results;
}

/**
 * The QEMU plan for anything that loads a snapshot's state: its device set must
 * match the snapshot's exactly (a NIC the snapshot has stays, isolated if asked),
 * so every such QEMU (child, materialiser, benchmark floor) is planned here.
 */
export function planRestore(
  snapshot: Pick<SnapshotInfo, "accel" | "memoryMib" | "vcpus" | "image" | "network" | "machine">,
  opts: { runDir: string; memory: VmPlan["memory"]; network: boolean; startPaused?: boolean },
): VmPlan {
  return {
    accel: snapshot.accel,
    machine: snapshot.machine ?? "v1",
    memoryMib: snapshot.memoryMib,
    vcpus: snapshot.vcpus,
    runDir: opts.runDir,
    rootfs: snapshot.image.rootfs,
    memory: opts.memory,
    incoming: true,
    ...(opts.startPaused ? { startPaused: true } : {}),
    network: snapshot.network ? (opts.network ? "user" : "isolated") : "none",
  };
}

async function restoreChild(
  snapshot: SnapshotInfo,
  memory: VmPlan["memory"],
  opts: ForkOpts,
  egress: { policy: EgressPolicy; netns: string | undefined },
): Promise<ForkChildResult> {
  const id = newSandboxId();
  const runDir = await makeRunDir(id);
  // Whatever this child holds is given back newest first if it fails, every step even if one throws.
  const undo = new UndoStack();
  undo.push("remove the runtime dir", () => removeRunDir(runDir));
  const plan = planRestore(snapshot, { runDir, memory, network: opts.network ?? true });
  const uid = runDirUid(runDir);
  const mode = plan.network === "user" ? (egress.netns ? "public" : "unfiltered") : "none";
  let pid: number | undefined;
  let cgroup: string | undefined;
  let qmp: QmpClient | undefined;
  let agent: AgentClient | undefined;
  const t0 = performance.now();
  try {
    // Intent before action: the row exists, "starting", before the VMM does. A starter
    // that dies anywhere from here leaves a row that start-up recovery kills and reaps;
    // only the identity answer below makes it "running" (re-adopted after a restart).
    const owner = selfIdentity();
    sandboxes.insert({
      id,
      tag: snapshot.tag,
      image: snapshot.image.name,
      pid: 0,
      pid_start: "",
      run_dir: runDir,
      state: "starting",
      created_at: new Date().toISOString(),
      accel: snapshot.accel,
      memory_mib: snapshot.memoryMib,
      vcpus: snapshot.vcpus,
      network: plan.network,
      network_policy: JSON.stringify(policyView(mode, mode === "none" ? { allowOut: [], denyOut: [] } : egress.policy)),
      memory_limit_mib: opts.memoryLimitMib ?? null,
      cgroup: null,
      expires_at_ms: opts.ttlMs !== undefined ? Date.now() + opts.ttlMs : null,
      metadata: opts.metadata ? JSON.stringify(opts.metadata) : null,
      owner_pid: owner.pid,
      owner_start: owner.start,
      vmm_uid: uid ?? null,
    });
    undo.push("remove the sandbox row", () => sandboxes.remove(id));
    // Pushed before the rules are written: a failure half way through writing them leaves some.
    undo.push("remove the egress rules", () => removeSandboxEgress(uid));
    // Pushed before the VMM starts so it unwinds after the kill: a cgroup with a process in it cannot be removed.
    undo.push("remove the cgroup", () => removeCgroup(cgroup));
    faultPoint("fork.row-written");
    // Again per child, after its runtime dir exists: cleanup removes an unused namespace only when no VM dir is left.
    const netns = egress.netns ? await ensureEgressNamespace() : undefined;
    if (netns) {
      // Always written, even for the default: a freed uid may still carry a dead sandbox's rules.
      if (uid !== undefined) await applySandboxEgress(uid, plan.network === "user" ? egress.policy : "none");
      else if (!isEmptyPolicy(egress.policy)) {
        throw new ForkdError(
          "not_supported",
          "allow_out/deny_out are keyed by each VMM's own uid, which needs confinement (FORKD_CONFINE is off)",
        );
      }
    }
    faultPoint("fork.before-launch");
    const vmstate = fs.openSync(snapshot.vmstatePath, "r");
    let launched: ReturnType<typeof launchQemu>;
    try {
      launched = launchQemu({ plan, dieWithParent: false, inheritFds: [vmstate], ...(netns ? { netns } : {}) });
    } finally {
      fs.closeSync(vmstate);
    }
    const vmmPid = launched.pid;
    pid = vmmPid;
    undo.push("kill the VMM", () => killAndWait(vmmPid, runDir));
    faultPoint("fork.launched");
    sandboxes.setVmm(id, pid, processStartTime(pid));
    // Every child gets a CPU quota, asked for or not: a guest spinning all its vCPUs must not starve its neighbours.
    cgroup = limitSandbox(id, pid, {
      ...(opts.memoryLimitMib !== undefined ? { memoryMib: opts.memoryLimitMib } : {}),
      cpus: opts.cpuLimit ?? snapshot.vcpus,
      cpusRequested: opts.cpuLimit !== undefined,
    });
    sandboxes.setCgroup(id, cgroup ?? null);
    const exited = launched.exited.then(async ({ code, signal }) => {
      const log = await qemuLogTail(runDir);
      throw new ForkdError(
        "vm_start_failed",
        `QEMU exited (${signal ?? `code ${code}`}) during restore: ${log.trim().slice(-1500) || "no output"}`,
      );
    });
    if (opts.pool) pooledRows.mark(id, opts.pool);
    if (opts.background) setSandboxPriority(pid, cgroup, opts.cpuLimit ?? snapshot.vcpus, "background");
    const race = <T>(p: Promise<T>) => Promise.race([p, exited]);
    qmp = await race(QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 30_000 }));
    const t1 = performance.now();
    // Attach to the agent port before the state loads: the parent was snapshotted
    // with its host attached, so the guest then resumes exactly as it was, its read
    // still pending, and needs no disconnect/reconnect handling before it answers.
    agent = await race(AgentClient.connect(runtimePaths(runDir).agent, { timeoutMs: 10_000 }));
    await race(qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] }));
    // fd 3 is the vmstate file QEMU inherited at spawn: no helper process per child.
    await race(qmp.execute("migrate-incoming", { uri: "fd:3" }));
    for (;;) {
      const { status } = await race(qmp.execute("query-status", {}));
      if (status === "paused") {
        const migration = await race(qmp.execute("query-migrate", {}));
        if (migration.status === "completed") {
          faultPoint("fork.before-cont");
          await race(qmp.execute("cont", {}));
          break;
        }
        if (migration.status === "failed")
          throw new ForkdError("vm_start_failed", `loading device state failed: ${migration["error-desc"] ?? "unknown"}`);
      } else if (status === "running") {
        break;
      } else if (status !== "inmigrate" && status !== "prelaunch" && status !== "restore-vm") {
        throw new ForkdError("vm_start_failed", `restore ended in state '${status}' instead of running`);
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    const t2 = performance.now();
    // The first call a child answers is its identity (hostname, fresh entropy, clock):
    // it proves the agent is up and makes the child distinct before anyone uses it.
    const identity = { hostname: id, entropy: randomBytes(64).toString("base64"), clockMs: Date.now() };
    agent = await race(
      waitForAgent(
        runtimePaths(runDir).agent,
        opts.readyTimeoutMs ?? 60_000,
        runDir,
        opts.signal,
        (a, ms) => a.identity({ ...identity, clockMs: Date.now() }, { timeoutMs: ms }),
        agent,
      ),
    );
    const t3 = performance.now();
    faultPoint("fork.before-confirm");
    sandboxes.confirm(id);
    faultPoint("fork.confirmed");
    if (opts.keepAgent) {
      opts.keepAgent(id, agent);
      agent = undefined;
    }
    undo.commit();
    return {
      ok: true,
      id,
      pid,
      timings: { vmmStartMs: t1 - t0, restoreMs: t2 - t1, firstAnswerMs: t3 - t2, totalMs: t3 - t0 },
    };
  } catch (err) {
    // Nothing stays running for a child that failed; its logs are kept for the user first.
    agent?.close();
    await saveConsole(qmp, runDir);
    const consoleLog = await keepLogs(id, runDir);
    qmp?.close();
    const reported = await undo.rollback(err);
    const e = reported instanceof ForkdError ? reported : new ForkdError("vm_start_failed", (reported as Error).message);
    return { ok: false, id, error: { code: e.code, message: e.message, ...(consoleLog ? { console: consoleLog } : {}) } };
  } finally {
    agent?.close();
    qmp?.close();
  }
}
