// Starting, identifying and stopping VMM processes, and their private runtime dirs.
import { spawn } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { forkdRunDir, qemuBinary, vmsRunDir } from "../common/config.js";
import { ensurePrivateDir, ensureRuntimeDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { readVmmFile, readVmmFileSync, writeVmmFile } from "../common/fsutil.js";
import { isAlive, procStatFields } from "../common/pid.js";
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
 * and hands the dir to that uid: QEMU creates its sockets and pid file there. The
 * claim is kept where no VMM can write (claimUid): a VMM owns its runtime dir, so
 * nothing in it may say which uid is whose.
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
    const uid = claimUid(dir);
    fs.writeFileSync(path.join(vmUidsDir(), id), `${uid}\n`, { mode: 0o600 });
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
  const bytes = readVmmFileSync(path.join(runDir, OWNER_FILE), 64);
  if (bytes === undefined) return undefined;
  const text = bytes.toString("utf8");
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
 * Every VMM (or its launcher, before the exec) started for `runDir`: for a VMM
 * launched but not yet recorded when its starter died. Found by what a VMM cannot
 * change (isOurVmm), never by its command line.
 */
export function findOurQemus(runDir: string): number[] {
  const uid = runDirUid(runDir);
  const found: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    if (isOurVmm(Number(entry), runDir, uid)) found.push(Number(entry));
  }
  return found;
}

/** uid -> the runtime dir (or copier) that holds it: root's, 0700, never inside a VMM's view. */
function uidsDir(): string {
  return ensurePrivateDir(path.join(forkdRunDir(), "uids"), { kind: "runtime dir (FORKD_RUN_DIR)" });
}

/** VM id -> its VMM's uid: the reverse of uidsDir, as private. */
function vmUidsDir(): string {
  return ensurePrivateDir(path.join(forkdRunDir(), "vm-uids"), { kind: "runtime dir (FORKD_RUN_DIR)" });
}

/**
 * Claim a uid of forkd's range no other VMM or copier holds, for a process that
 * belongs to `runDir` (freed by cleanup once that dir is gone).
 */
export function claimUid(runDir: string): number {
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

/** Free a uid claimed for `runDir`; a claim that names another dir is not ours to free. */
export function releaseUid(uid: number, runDir: string): void {
  const file = path.join(forkdRunDir(), "uids", String(uid));
  try {
    if (fs.readFileSync(file, "utf8") === runDir) fs.rmSync(file, { force: true });
  } catch {
    // already free
  }
}

/**
 * The uid a runtime dir's VMM was given, if confinement gave it one: read from
 * root's own records (vm-uids, checked against the uid's claim), never from the
 * runtime dir, which the VMM owns and could rewrite to free another VM's uid.
 */
export function runDirUid(runDir: string): number | undefined {
  if (path.dirname(runDir) !== vmsRunDir()) return undefined;
  let uid: number;
  try {
    uid = Number(fs.readFileSync(path.join(forkdRunDir(), "vm-uids", path.basename(runDir)), "utf8").trim());
  } catch {
    return undefined;
  }
  if (!Number.isInteger(uid) || uid < VMM_UID_BASE || uid >= VMM_UID_BASE + VMM_UID_COUNT) return undefined;
  try {
    return fs.readFileSync(path.join(forkdRunDir(), "uids", String(uid)), "utf8") === runDir ? uid : undefined;
  } catch {
    return undefined;
  }
}

/** Remove a VM's runtime dir and free its uid. */
export async function removeRunDir(runDir: string): Promise<void> {
  const uid = runDirUid(runDir);
  await fsp.rm(runDir, { recursive: true, force: true });
  if (uid !== undefined) releaseUid(uid, runDir);
  if (path.dirname(runDir) === vmsRunDir()) await fsp.rm(path.join(forkdRunDir(), "vm-uids", path.basename(runDir)), { force: true });
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
  let vms: string[] = [];
  try {
    vms = await fsp.readdir(path.join(forkdRunDir(), "vm-uids"));
  } catch {
    return freed;
  }
  for (const id of vms) {
    if (!fs.existsSync(path.join(vmsRunDir(), id))) await fsp.rm(path.join(forkdRunDir(), "vm-uids", id), { force: true });
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
 * Take a staged memory image back from the VMM that wrote it (a snapshot parent or
 * a materialiser, as its own uid): root's, read-only, in a dir only root enters.
 * Children never open it: they map its sealed memfd copy (store/sealed-images.ts),
 * since QEMU 7.2 opens mem-path read-write even for a private mapping.
 */
export function keepFromVmms(file: string): void {
  const dir = path.dirname(file);
  const owner = process.geteuid?.() ?? 0;
  const group = process.getegid?.() ?? 0;
  // The dir first (root made it, in root's staging dir: it is no link): once it is
  // root's 0700 no VMM can change what its names point to. Then the file, by
  // descriptor, and only a plain file with one name: a VMM that put a symlink or a
  // hard link to a host file there gets neither that file chowned nor its bytes taken.
  const dirStat = fs.lstatSync(dir);
  if (!dirStat.isDirectory()) throw new ForkdError("integrity_failed", `${dir} is not a directory`);
  fs.chownSync(dir, owner, group);
  fs.chmodSync(dir, 0o700);
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (err) {
    throw new ForkdError(
      "integrity_failed",
      `the memory image ${file} a VMM wrote cannot be opened as a plain file: ${(err as Error).message}`,
    );
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() || st.nlink !== 1) {
      throw new ForkdError("integrity_failed", `the memory image ${file} a VMM wrote is not a plain file with one name`);
    }
    fs.fchownSync(fd, owner, group);
    fs.fchmodSync(fd, 0o400);
  } finally {
    fs.closeSync(fd);
  }
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
  // The runtime dir is the VMM's: never append through a link someone left there.
  const log = fs.openSync(
    paths.qemuLog,
    fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK,
    0o600,
  );
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
    // A VMM that sends nothing (no NIC, an isolated one, a materialiser) and is not
    // put in the egress namespace gets an empty one of its own, never the host's.
    const emptyNetns = !opts.netns && plan.network !== "user" ? ["--unshare-net"] : [];
    const prefix =
      uid !== undefined
        ? [
            ...emptyNetns,
            ...launcherArgs(
              planConfinement(plan, uid, { kvmGid: kvmGroup(), ...(opts.netns ? { netns: opts.netns } : {}) }),
              opts.dieWithParent,
            ),
          ]
        : [
            ...emptyNetns,
            ...(opts.netns ? ["--netns", opts.netns] : []),
            ...(plan.memory.kind === "sealed" ? ["--memfd", plan.memory.source] : []),
            ...(opts.dieWithParent ? ["--parent-pid", String(process.pid), "--die-with-parent"] : []),
            "--",
          ];
    child = spawn(launcher, [...prefix, binary, ...args], {
      // Nothing of the daemon's environment (registry password, FORKD_TOKEN, cloud
      // credentials) reaches a VMM: QEMU needs none of it, and the launcher execs it
      // with an empty environment besides.
      env: {},
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

/** A process's real, effective, saved and filesystem uids, from /proc/PID/status. */
function processUids(pid: number): number[] | undefined {
  try {
    const line = /^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
    return line ? line.slice(1, 5).map(Number) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * True only if `pid` is the VMM of this runtime dir (or its launcher, before the
 * exec): never signal a stranger's process. A confined VMM is known by its uid,
 * claimed for this dir alone and set by the root launcher; without capabilities
 * the VMM cannot change it, whereas its command line it can rewrite at will (its
 * argv is its own memory). The launcher before the exec is root running our
 * binary with our arguments: nothing of the VMM's yet. Unconfined VMMs run as
 * root and are known by command line, all there is.
 */
export function isOurVmm(pid: number, runDir: string, uid = runDirUid(runDir)): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  if (uid === undefined) return cmdlineNames(pid, runDir, "qemu-system");
  const uids = processUids(pid);
  if (!uids) return false;
  if (uids.every((u) => u === uid)) return true;
  return uids.every((u) => u === 0) && isLauncher(pid) && cmdlineNames(pid, runDir, "");
}

function cmdlineNames(pid: number, runDir: string, program: string): boolean {
  try {
    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmdline.includes(program) && cmdline.includes(`${runDir}/qmp.sock`);
  } catch {
    return false;
  }
}

function isLauncher(pid: number): boolean {
  try {
    return fs.readlinkSync(`/proc/${pid}/exe`) === fs.realpathSync(launcherPath());
  } catch {
    return false;
  }
}

/** Process start time from /proc/PID/stat: with the pid, it names a process uniquely (pids are reused). */
export function processStartTime(pid: number): string {
  try {
    return procStatFields(pid)[19] ?? "";
  } catch {
    return "";
  }
}

/** SIGTERM, then SIGKILL after a grace period; only ever a process that is provably our VMM. */
export async function killAndWait(pid: number, runDir: string, launched?: Launched, graceMs = 2000): Promise<void> {
  const ours = launched !== undefined || isOurVmm(pid, runDir);
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
    if (typeof text === "string") await writeVmmFile(runtimePaths(runDir).console, text);
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
    // Both files lie in the VMM's own dir: read without following links, at most the ring's size.
    const consoleLog = path.join(logsDir, `${id}.console.log`);
    await fsp.writeFile(consoleLog, (await readVmmFile(runtimePaths(runDir).console, CONSOLE_RING_BYTES)) ?? "", { mode: 0o600 });
    const qemuLog = await readVmmFile(runtimePaths(runDir).qemuLog, KEPT_QEMU_LOG_BYTES);
    if (qemuLog) await fsp.writeFile(path.join(logsDir, `${id}.qemu.log`), qemuLog, { mode: 0o600 });
    return consoleLog;
  } catch {
    return undefined;
  }
}

/** What QEMU's own log may hold that forkd keeps or quotes: its last 64 KiB. */
const KEPT_QEMU_LOG_BYTES = 64 * 1024;

/** The end of a VM's QEMU log (stdout and stderr), for an error message; empty when it is not a plain file. */
export async function qemuLogTail(runDir: string, maxBytes = 4096): Promise<string> {
  return ((await readVmmFile(runtimePaths(runDir).qemuLog, maxBytes)) ?? Buffer.alloc(0)).toString("utf8");
}

export async function raceExit<T>(work: Promise<T>, launched: Launched, runDir: string): Promise<T> {
  const exited = launched.exited.then(async ({ code, signal }) => {
    const log = await qemuLogTail(runDir);
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
