// Sandboxes restored from snapshots: fork N children copy-on-write, find them
// again from any process (SQLite), and tear them down without leaving anything.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { AgentClient } from "./agent-client.js";
import { limitMemory, removeCgroup } from "./cgroup.js";
import { shmDir, snapshotsDir, vmsRunDir } from "./config.js";
import { ForkdError } from "./errors.js";
import { isAlive, isOurQemu, launchQemu, runtimePaths, type VmPlan } from "./qemu.js";
import { QmpClient } from "./qmp.js";
import { ensureStaged, getSnapshot, type SnapshotInfo } from "./snapshot.js";
import { type SandboxRow, sandboxes } from "./state.js";
import { validateSandboxId } from "./validate.js";
import { keepLogs, killAndWait, makeRunDir, newSandboxId, waitForAgent } from "./vm.js";

export const MAX_FORK = 1000;

export type ForkOpts = {
  tag: string;
  n: number;
  memoryLimitMib?: number;
  network?: boolean;
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
};

export type ForkTimings = {
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

export function validateForkCount(n: unknown): number {
  if (typeof n !== "number" || !Number.isInteger(n) || n < 1 || n > MAX_FORK) {
    throw new ForkdError("bad_request", `the number of children must be a whole number from 1 to ${MAX_FORK}, got ${String(n)}`);
  }
  return n;
}

/** Process start time from /proc/PID/stat: with the pid, it names a process uniquely (pids are reused). */
export function processStartTime(pid: number): string {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    // comm may contain spaces and parens: fields restart after the last ')'.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19] ?? "";
  } catch {
    return "";
  }
}

export function sandboxAlive(row: Pick<SandboxRow, "pid" | "pid_start" | "run_dir">): boolean {
  return isAlive(row.pid) && processStartTime(row.pid) === row.pid_start && isOurQemu(row.pid, row.run_dir);
}

export async function forkSandboxes(opts: ForkOpts): Promise<ForkChildResult[]> {
  const n = validateForkCount(opts.n);
  if (opts.memoryLimitMib !== undefined && (!Number.isInteger(opts.memoryLimitMib) || opts.memoryLimitMib < 64)) {
    throw new ForkdError("bad_request", `--memory-limit-mib must be a whole number of at least 64, got ${opts.memoryLimitMib}`);
  }
  if (opts.ttlMs !== undefined && (!Number.isInteger(opts.ttlMs) || opts.ttlMs < 1000 || opts.ttlMs > 30 * 24 * 3_600_000)) {
    throw new ForkdError("bad_request", `the sandbox timeout must be a whole number of ms from 1000 to 30 days, got ${opts.ttlMs}`);
  }
  if (opts.metadata !== undefined && JSON.stringify(opts.metadata).length > 16_384) {
    throw new ForkdError("too_large", "metadata is limited to 16 KiB of JSON");
  }
  const snapshot = await getSnapshot(opts.tag);
  const memoryPath = await ensureStaged(snapshot);
  const concurrency = Math.max(1, Math.min(opts.concurrency ?? 16, n));
  const results: ForkChildResult[] = new Array(n);
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const index = next++;
      opts.signal?.throwIfAborted();
      const result = await restoreChild(snapshot, memoryPath, opts);
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
  snapshot: Pick<SnapshotInfo, "accel" | "memoryMib" | "vcpus" | "image" | "network">,
  opts: { runDir: string; memory: VmPlan["memory"]; network: boolean; startPaused?: boolean },
): VmPlan {
  return {
    accel: snapshot.accel,
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

async function restoreChild(snapshot: SnapshotInfo, memoryPath: string, opts: ForkOpts): Promise<ForkChildResult> {
  const id = newSandboxId();
  const runDir = await makeRunDir(id);
  const plan = planRestore(snapshot, { runDir, memory: { kind: "file", path: memoryPath, share: false }, network: opts.network ?? true });
  let pid: number | undefined;
  let cgroup: string | undefined;
  let qmp: QmpClient | undefined;
  let agent: AgentClient | undefined;
  const t0 = performance.now();
  try {
    const vmstate = fs.openSync(snapshot.vmstatePath, "r");
    let launched: ReturnType<typeof launchQemu>;
    try {
      launched = launchQemu({ plan, dieWithParent: false, inheritFds: [vmstate] });
    } finally {
      fs.closeSync(vmstate);
    }
    pid = launched.pid;
    if (opts.memoryLimitMib !== undefined) cgroup = limitMemory(id, pid, opts.memoryLimitMib);
    sandboxes.insert({
      id,
      tag: snapshot.tag,
      image: snapshot.image.name,
      pid,
      pid_start: processStartTime(pid),
      run_dir: runDir,
      state: "running",
      created_at: new Date().toISOString(),
      accel: snapshot.accel,
      memory_mib: snapshot.memoryMib,
      vcpus: snapshot.vcpus,
      network: plan.network,
      memory_limit_mib: opts.memoryLimitMib ?? null,
      cgroup: cgroup ?? null,
      expires_at_ms: opts.ttlMs !== undefined ? Date.now() + opts.ttlMs : null,
      metadata: opts.metadata ? JSON.stringify(opts.metadata) : null,
    });
    const exited = launched.exited.then(async ({ code, signal }) => {
      const log = await fsp.readFile(runtimePaths(runDir).qemuLog, "utf8").catch(() => "");
      throw new ForkdError(
        "vm_start_failed",
        `QEMU exited (${signal ?? `code ${code}`}) during restore: ${log.trim().slice(-1500) || "no output"}`,
      );
    });
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
    if (opts.keepAgent) {
      opts.keepAgent(id, agent);
      agent = undefined;
    }
    return {
      ok: true,
      id,
      pid,
      timings: { vmmStartMs: t1 - t0, restoreMs: t2 - t1, firstAnswerMs: t3 - t2, totalMs: t3 - t0 },
    };
  } catch (err) {
    // Nothing stays running for a child that failed; its logs are kept for the user.
    const consoleLog = await keepLogs(id, runDir);
    agent?.close();
    qmp?.close();
    if (pid !== undefined) await killAndWait(pid, runDir);
    await removeCgroup(cgroup);
    sandboxes.remove(id);
    await fsp.rm(runDir, { recursive: true, force: true });
    const e = err instanceof ForkdError ? err : new ForkdError("vm_start_failed", (err as Error).message);
    return { ok: false, id, error: { code: e.code, message: e.message, ...(consoleLog ? { console: consoleLog } : {}) } };
  } finally {
    agent?.close();
    qmp?.close();
  }
}

export type SandboxInfo = SandboxRow & { alive: boolean };

/** A sandbox by id, or a clear not-found naming `forkd ls`. Dead ones are reaped on the way. */
export function getSandbox(id: string): SandboxInfo {
  validateSandboxId(id);
  const row = sandboxes.get(id);
  if (!row) throw new ForkdError("sandbox_not_found", `no sandbox ${id}; \`forkd ls\` lists them`, { id });
  const alive = sandboxAlive(row);
  if (!alive) {
    void reapSandbox(row);
    throw new ForkdError("sandbox_not_found", `sandbox ${id} is no longer running (its VMM exited); it has been removed`, { id });
  }
  return { ...row, alive };
}

export function listSandboxes(): SandboxInfo[] {
  return sandboxes.list().map((row) => ({ ...row, alive: sandboxAlive(row) }));
}

/** Connect to a sandbox's agent. One client at a time: the chardev queues a second until the first leaves. */
export async function connectSandbox(id: string, timeoutMs = 30_000): Promise<AgentClient> {
  const row = getSandbox(id);
  return waitForAgent(runtimePaths(row.run_dir).agent, timeoutMs, row.run_dir);
}

export async function killSandbox(id: string): Promise<void> {
  validateSandboxId(id);
  const row = sandboxes.get(id);
  if (!row) throw new ForkdError("sandbox_not_found", `no sandbox ${id}; \`forkd ls\` lists them`, { id });
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

async function reapSandbox(row: SandboxRow): Promise<void> {
  await removeCgroup(row.cgroup);
  await fsp.rm(row.run_dir, { recursive: true, force: true });
  sandboxes.remove(row.id);
}

/** Kill sandboxes whose time limit has passed. */
export async function expireSandboxes(nowMs = Date.now()): Promise<string[]> {
  const expired = sandboxes.expired(nowMs);
  for (const row of expired) await killSandbox(row.id).catch(() => {});
  return expired.map((r) => r.id);
}

export type CleanupReport = {
  reaped: string[];
  expired: string[];
  failedBranches: string[];
  strayRunDirs: string[];
  strayTempDirs: string[];
};

/**
 * Reap sandboxes whose VMM is gone, runtime dirs nobody owns, and snapshot temp
 * dirs whose writer died. Never touches a live process that is not provably ours.
 */
export async function cleanup(): Promise<CleanupReport> {
  const { recoverBranches } = await import("./branch.js");
  const report: CleanupReport = {
    reaped: [],
    expired: await expireSandboxes(),
    failedBranches: recoverBranches(),
    strayRunDirs: [],
    strayTempDirs: [],
  };
  const known = new Set<string>();
  for (const row of sandboxes.list()) {
    if (sandboxAlive(row)) {
      known.add(row.run_dir);
      continue;
    }
    await reapSandbox(row);
    report.reaped.push(row.id);
  }
  let dirs: string[] = [];
  try {
    dirs = await fsp.readdir(vmsRunDir());
  } catch {
    // no runtime dir yet
  }
  for (const name of dirs) {
    const dir = path.join(vmsRunDir(), name);
    if (known.has(dir)) continue;
    const pid = Number((await fsp.readFile(runtimePaths(dir).pidfile, "utf8").catch(() => "")).trim());
    // A VM being started right now (by `forkd run` or a fork in progress) owns its dir.
    if (Number.isInteger(pid) && pid > 0 && isOurQemu(pid, dir)) continue;
    const stat = await fsp.stat(dir).catch(() => undefined);
    if (stat && Date.now() - stat.mtimeMs < 60_000 && !(await fsp.readFile(runtimePaths(dir).pidfile).catch(() => undefined))) {
      continue; // just created; QEMU has not written its pid file yet
    }
    await fsp.rm(dir, { recursive: true, force: true });
    report.strayRunDirs.push(name);
  }
  for (const base of [snapshotsDir(), path.join(shmDir(), "images")]) {
    let names: string[] = [];
    try {
      names = await fsp.readdir(base);
    } catch {
      continue;
    }
    for (const name of names) {
      const m = /(?:^\.tmp-|^\.rm-|\.tmp-)(\d+)-[0-9a-f]+$/.exec(name);
      if (!m) continue;
      if (isAlive(Number(m[1]))) continue;
      await fsp.rm(path.join(base, name), { recursive: true, force: true });
      report.strayTempDirs.push(path.join(base, name));
    }
  }
  return report;
}
