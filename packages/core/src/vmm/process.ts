// Starting, identifying and stopping VMM processes, and their private runtime dirs.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { forkdRunDir, qemuBinary, vmsRunDir } from "../common/config.js";
import { ensurePrivateDir, ensureRuntimeDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { buildQemuArgs, runtimePaths, type VmPlan } from "./plan.js";

export function newSandboxId(): string {
  return `sb-${randomBytes(6).toString("hex")}`;
}

export async function makeRunDir(id: string): Promise<string> {
  ensureRuntimeDir();
  const base = ensurePrivateDir(vmsRunDir(), { kind: "runtime dir (FORKD_RUN_DIR)" });
  const dir = path.join(base, id);
  await fsp.mkdir(dir, { mode: 0o700 });
  return dir;
}

export type LaunchOpts = {
  plan: VmPlan;
  /** Kill the VMM when the launching process dies (for `forkd run`); off for sandboxes that outlive the CLI. */
  dieWithParent: boolean;
  /** Open fds handed to QEMU as fd 3, 4, …; the caller closes its copies after launch. */
  inheritFds?: number[];
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
    const [file, argv] =
      opts.dieWithParent && fs.existsSync("/usr/bin/setpriv")
        ? ["/usr/bin/setpriv", ["--pdeathsig", "KILL", "--", binary, ...args]]
        : [binary, args];
    child = spawn(file as string, argv as string[], {
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

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
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
