// Starting, identifying and stopping VMM processes, and their private runtime dirs.
import { spawn } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { forkdRunDir, qemuBinary, vmsRunDir } from "../common/config.js";
import { ensurePrivateDir, ensureRuntimeDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { isAlive } from "../common/pid.js";
import {
  confinementEnabled,
  kvmGroup,
  launcherArgs,
  launcherPath,
  planConfinement,
  VMM_GID,
  VMM_UID_BASE,
  VMM_UID_COUNT,
} from "./confine.js";
import { buildQemuArgs, CONSOLE_RING_BYTES, runtimePaths, type VmPlan } from "./plan.js";
import type { QmpClient } from "./qmp.js";

export function newSandboxId(): string {
  return `sb-${randomBytes(6).toString("hex")}`;
}

/**
 * A VM's private runtime dir. With confinement on it also claims the VM's own uid
 * (a file named by the uid under FORKD_RUN_DIR/uids, created exclusively) and
 * hands the dir to that uid: QEMU creates its sockets and pid file there.
 */
export async function makeRunDir(id: string): Promise<string> {
  ensureRuntimeDir();
  const base = ensurePrivateDir(vmsRunDir(), { kind: "runtime dir (FORKD_RUN_DIR)" });
  const dir = path.join(base, id);
  await fsp.mkdir(dir, { mode: 0o700 });
  // Who made it, before anything runs in it: if that process dies before a record
  // owns the dir (a sandbox row) or it is removed, cleanup knows it is abandoned.
  fs.writeFileSync(path.join(dir, OWNER_FILE), `${process.pid} ${processStartTime(process.pid)}\n`, { mode: 0o444 });
  if (confinementEnabled()) {
    requireRoot();
    const uid = claimVmmUid(dir);
    fs.writeFileSync(path.join(dir, "vmm.uid"), `${uid}\n`, { mode: 0o644 });
    fs.chownSync(dir, uid, VMM_GID);
  }
  return dir;
}

const OWNER_FILE = "owner";

/**
 * Is the process that made this runtime dir still alive? undefined for a dir made
 * before owners were recorded. (A VMM may rewrite the file in its own dir; the
 * worst it can do is keep its dir from being removed after it died.)
 */
export function runDirOwnerAlive(runDir: string): boolean | undefined {
  let text: string;
  try {
    text = fs.readFileSync(path.join(runDir, OWNER_FILE), "utf8");
  } catch {
    return undefined;
  }
  const [pid, start] = text.trim().split(" ");
  return sameProcess(Number(pid), start ?? "");
}

/** The process `pid` that started at `start` (processStartTime) still runs: a reused pid is another process. */
export function sameProcess(pid: number | null | undefined, start: string | null | undefined): boolean {
  if (!pid || !Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return false;
  return !start || processStartTime(pid) === start;
}

/** This process, as sameProcess identifies it. */
export function selfIdentity(): { pid: number; start: string } {
  return { pid: process.pid, start: processStartTime(process.pid) };
}

/**
 * Every QEMU (or its launcher, before the exec) started for `runDir`, found by
 * command line: for a VMM launched but not yet recorded when its starter died.
 */
export function findOurQemus(runDir: string): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    if (isOurQemu(Number(entry), runDir)) found.push(Number(entry));
  }
  return found;
}

function uidsDir(): string {
  return ensurePrivateDir(path.join(forkdRunDir(), "uids"), { kind: "runtime dir (FORKD_RUN_DIR)" });
}

function claimVmmUid(runDir: string): number {
  const dir = uidsDir();
  for (let attempt = 0; attempt < 64; attempt++) {
    const uid = VMM_UID_BASE + randomInt(VMM_UID_COUNT);
    try {
      fs.writeFileSync(path.join(dir, String(uid)), runDir, { flag: "wx", mode: 0o600 });
      return uid;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
  }
  throw new ForkdError("over_limit", `no free VMM uid in forkd's range of ${VMM_UID_COUNT}; run \`forkd cleanup\``);
}

/** The uid a runtime dir was given, if confinement gave it one. */
export function runDirUid(runDir: string): number | undefined {
  try {
    const uid = Number(fs.readFileSync(path.join(runDir, "vmm.uid"), "utf8").trim());
    return Number.isInteger(uid) ? uid : undefined;
  } catch {
    return undefined;
  }
}

/** Remove a VM's runtime dir and free its uid. */
export async function removeRunDir(runDir: string): Promise<void> {
  const uid = runDirUid(runDir);
  await fsp.rm(runDir, { recursive: true, force: true });
  if (uid !== undefined) await fsp.rm(path.join(forkdRunDir(), "uids", String(uid)), { force: true });
}

/** uid claims whose runtime dir is gone (a crash between the two): freed by cleanup. */
export async function releaseStaleUids(): Promise<number[]> {
  const freed: number[] = [];
  let names: string[] = [];
  try {
    names = await fsp.readdir(path.join(forkdRunDir(), "uids"));
  } catch {
    return freed;
  }
  for (const name of names) {
    const file = path.join(forkdRunDir(), "uids", name);
    const owner = await fsp.readFile(file, "utf8").catch(() => undefined);
    if (owner === undefined || fs.existsSync(owner)) continue;
    await fsp.rm(file, { force: true });
    freed.push(Number(name));
  }
  return freed;
}

function requireRoot(): void {
  if (process.geteuid?.() !== 0) {
    throw new ForkdError(
      "not_supported",
      "confining each VMM (own uid, no capabilities, private mount view) needs root; run forkd as root, or set FORKD_CONFINE=off to run VMMs unconfined (`forkd doctor` then reports a failed check)",
    );
  }
}

/**
 * Make a staged memory image usable by every VMM and owned by forkd again (a
 * snapshot parent or materialiser wrote it as its own uid). QEMU 7.2 opens a
 * memory-backend-file read-write even for a private (copy-on-write) mapping, so
 * the VMM group may write it: see the security model in the README.
 */
export function shareWithVmms(file: string): void {
  const dir = path.dirname(file);
  const owner = process.geteuid?.() ?? 0;
  if (!confinementEnabled()) {
    fs.chmodSync(file, 0o444);
    return;
  }
  fs.chownSync(dir, owner, VMM_GID);
  fs.chmodSync(dir, 0o750);
  fs.chownSync(file, owner, VMM_GID);
  fs.chmodSync(file, 0o660);
}

/** Give the VMM of `runDir` a file or dir it must write (a snapshot parent's memory file, say). */
export function grantToVmm(target: string, runDir: string): void {
  const uid = runDirUid(runDir);
  if (uid !== undefined) fs.chownSync(target, uid, VMM_GID);
}

export type LaunchOpts = {
  plan: VmPlan;
  /** Kill the VMM when the launching process dies (for `forkd run`); off for sandboxes that outlive the CLI. */
  dieWithParent: boolean;
  /** Open fds handed to QEMU as fd 3, 4, …; the caller closes its copies after launch. */
  inheritFds?: number[];
  /** Network namespace the VMM runs in (its user-mode network then reaches only what that namespace allows). */
  netns?: string;
};

export type Launched = { pid: number; exited: Promise<{ code: number | null; signal: string | null }> };

export function launchQemu(opts: LaunchOpts): Launched {
  const { plan } = opts;
  const paths = runtimePaths(plan.runDir);
  const binary = qemuBinary(plan.accel);
  if (!fs.existsSync(binary)) {
    throw new ForkdError("missing_dependency", `${binary} not found; install QEMU with: apt-get install qemu-system-x86 qemu-utils`);
  }
  const args = buildQemuArgs(plan);
  const log = fs.openSync(paths.qemuLog, "a", 0o600);
  // Sockets QEMU creates must be 0600: the umask is inherited at spawn and restored right after.
  const oldUmask = process.umask(0o077);
  let child: ReturnType<typeof spawn>;
  try {
    const launcher = launcherPath();
    if (!fs.existsSync(launcher)) {
      throw new ForkdError(
        "missing_dependency",
        `${launcher} is not built; run \`npm run build\` (it needs gcc: apt-get install gcc libc6-dev)`,
      );
    }
    const uid = runDirUid(plan.runDir);
    if (confinementEnabled() && uid === undefined) {
      throw new ForkdError("internal", `runtime dir ${plan.runDir} has no VMM uid; it was not made by makeRunDir`);
    }
    const prefix =
      uid !== undefined
        ? launcherArgs(planConfinement(plan, uid, { kvmGid: kvmGroup(), ...(opts.netns ? { netns: opts.netns } : {}) }), opts.dieWithParent)
        : [
            ...(opts.netns ? ["--netns", opts.netns] : []),
            ...(opts.dieWithParent ? ["--parent-pid", String(process.pid), "--die-with-parent"] : []),
            "--",
          ];
    child = spawn(launcher, [...prefix, binary, ...args], {
      detached: !opts.dieWithParent,
      stdio: ["ignore", log, log, ...(opts.inheritFds ?? [])],
    });
  } finally {
    process.umask(oldUmask);
    fs.closeSync(log);
  }
  if (child.pid === undefined) throw new ForkdError("vm_start_failed", `could not start ${binary}`);
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => {
    child.on("exit", (code, signal) => resolve({ code, signal }));
    child.on("error", () => resolve({ code: null, signal: null }));
  });
  if (!opts.dieWithParent) child.unref();
  return { pid: child.pid, exited };
}

/** True only if `pid` is a QEMU whose command line names this runtime dir: never signal a stranger's process. */
export function isOurQemu(pid: number, runDir: string): boolean {
  try {
    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmdline.includes("qemu-system") && cmdline.includes(`${runDir}/qmp.sock`);
  } catch {
    return false;
  }
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

/** SIGTERM, then SIGKILL after a grace period; only ever a process that is provably our QEMU. */
export async function killAndWait(pid: number, runDir: string, launched?: Launched, graceMs = 2000): Promise<void> {
  const ours = launched !== undefined || isOurQemu(pid, runDir);
  if (!ours) return;
  const gone = async (ms: number) => {
    const until = Date.now() + ms;
    while (Date.now() < until) {
      if (launched) {
        const done = await Promise.race([launched.exited.then(() => true), sleep(10).then(() => false)]);
        if (done) return true;
      } else {
        if (!isAlive(pid)) return true;
        await sleep(10);
      }
    }
    return false;
  };
  if (await gone(0)) return;
  try {
    process.kill(pid, "SIGTERM");
  } catch {
    return;
  }
  if (await gone(graceMs)) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  await gone(5000);
}

/**
 * Copy the console ring buffer to console.log in the runtime dir, while QEMU still
 * answers: called before a failed VM is torn down, so keepLogs has it to keep.
 */
export async function saveConsole(qmp: QmpClient | undefined, runDir: string): Promise<void> {
  if (!qmp || qmp.isClosed) return;
  try {
    const text = await qmp.execute("ringbuf-read", { device: "console", size: CONSOLE_RING_BYTES, format: "utf8" }, { timeoutMs: 2000 });
    await fsp.writeFile(runtimePaths(runDir).console, text, { mode: 0o600 });
  } catch {
    // QEMU is gone or wedged: there is no console to keep
  }
}

/** A VM that failed to start is torn down, but its console and QEMU logs are kept for the user to read. */
export async function keepLogs(id: string, runDir: string): Promise<string | undefined> {
  const logsDir = path.join(forkdRunDir(), "logs");
  try {
    ensureRuntimeDir();
    ensurePrivateDir(logsDir, { kind: "runtime dir (FORKD_RUN_DIR)" });
    const consoleLog = path.join(logsDir, `${id}.console.log`);
    await fsp.copyFile(runtimePaths(runDir).console, consoleLog).catch(() => fsp.writeFile(consoleLog, ""));
    await fsp.copyFile(runtimePaths(runDir).qemuLog, path.join(logsDir, `${id}.qemu.log`)).catch(() => {});
    return consoleLog;
  } catch {
    return undefined;
  }
}

export async function raceExit<T>(work: Promise<T>, launched: Launched, runDir: string): Promise<T> {
  const exited = launched.exited.then(async ({ code, signal }) => {
    const log = await fsp.readFile(runtimePaths(runDir).qemuLog, "utf8").catch(() => "");
    throw new ForkdError(
      "vm_start_failed",
      `QEMU exited (${signal ?? `code ${code}`}) before the guest was up: ${log.trim().slice(-1500) || "no output"}; console log: ${runtimePaths(runDir).console}`,
    );
  });
  return Promise.race([work, exited]);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
