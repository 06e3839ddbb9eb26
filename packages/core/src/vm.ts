// One VM = one QEMU process, a private runtime dir, a QMP connection and an agent
// connection. This file boots (cold) and tears down; restoring from a snapshot
// reuses the same pieces.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { chooseAccel } from "./accel.js";
import { AgentClient } from "./agent-client.js";
import { forkdRunDir, vmsRunDir } from "./config.js";
import { ForkdError } from "./errors.js";
import { getImage, type ImageManifest } from "./image.js";
import { type Accel, guestAppend, isAlive, isOurQemu, type Launched, launchQemu, runtimePaths, type VmPlan } from "./qemu.js";
import { QmpClient } from "./qmp.js";

export type VmState = "starting" | "running" | "paused" | "branching" | "stopped";

export function newSandboxId(): string {
  return `sb-${randomBytes(6).toString("hex")}`;
}

export async function makeRunDir(id: string): Promise<string> {
  const base = vmsRunDir();
  await fsp.mkdir(base, { recursive: true, mode: 0o700 });
  await fsp.chmod(base, 0o700);
  const dir = path.join(base, id);
  await fsp.mkdir(dir, { mode: 0o700 });
  return dir;
}

export type BootOpts = {
  image?: string;
  memoryMib?: number;
  vcpus?: number;
  accel?: Accel;
  network?: boolean;
  /** RAM in a shared file (a snapshot parent); private anonymous RAM otherwise. */
  memoryPath?: string;
  /** For `forkd run`: the VMM dies with this process. */
  ephemeral?: boolean;
  bootTimeoutMs?: number;
  signal?: AbortSignal;
};

export type BootTimings = { launchMs: number; qmpMs: number; agentMs: number; totalMs: number };

export class Vm {
  state: VmState = "starting";

  constructor(
    readonly id: string,
    readonly runDir: string,
    readonly pid: number,
    readonly accel: Accel,
    readonly qmp: QmpClient,
    public agent: AgentClient,
    private readonly launched?: Launched,
  ) {}

  get paths() {
    return runtimePaths(this.runDir);
  }

  /** Boot a fresh VM from an image and wait until its agent answers a ping. */
  static async boot(opts: BootOpts = {}): Promise<{ vm: Vm; image: ImageManifest; timings: BootTimings }> {
    const image = await getImage(opts.image ?? "base");
    const accel = opts.accel ?? (await chooseAccel()).accel;
    const id = newSandboxId();
    const runDir = await makeRunDir(id);
    const plan: VmPlan = {
      accel,
      memoryMib: opts.memoryMib ?? 256,
      vcpus: opts.vcpus ?? 1,
      runDir,
      rootfs: image.rootfs,
      memory: opts.memoryPath ? { kind: "file", path: opts.memoryPath, share: true } : { kind: "anon" },
      boot: { kernel: image.kernel, initrd: image.initrd, append: guestAppend(accel, fs.readFileSync("/proc/cpuinfo", "utf8")) },
      network: (opts.network ?? true) ? "user" : "none",
    };
    const t0 = performance.now();
    let launched: Launched | undefined;
    let qmp: QmpClient | undefined;
    let agent: AgentClient | undefined;
    try {
      launched = launchQemu({ plan, dieWithParent: opts.ephemeral ?? false });
      const t1 = performance.now();
      qmp = await raceExit(QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 10_000, signal: opts.signal }), launched, runDir);
      const t2 = performance.now();
      agent = await raceExit(waitForAgent(runtimePaths(runDir).agent, opts.bootTimeoutMs ?? 60_000, runDir, opts.signal), launched, runDir);
      const t3 = performance.now();
      const vm = new Vm(id, runDir, launched.pid, accel, qmp, agent, launched);
      vm.state = "running";
      return { vm, image, timings: { launchMs: t1 - t0, qmpMs: t2 - t1, agentMs: t3 - t2, totalMs: t3 - t0 } };
    } catch (err) {
      agent?.close();
      qmp?.close();
      if (launched) await killAndWait(launched.pid, runDir, launched);
      const kept = await keepLogs(id, runDir);
      await fsp.rm(runDir, { recursive: true, force: true });
      if (err instanceof ForkdError && kept) {
        throw new ForkdError(
          err.code,
          err.message.replaceAll(runtimePaths(runDir).console, kept),
          { ...err.details, console: kept },
          { cause: err },
        );
      }
      throw err;
    }
  }

  /** Stop the VMM for good and remove its runtime dir. Safe to call twice. */
  async destroy(): Promise<void> {
    if (this.state === "stopped") return;
    this.state = "stopped";
    this.agent.close();
    try {
      if (!this.qmp.isClosed) await this.qmp.execute("quit", {}, { timeoutMs: 2000 });
    } catch {
      // Already gone or wedged: the kill below handles both.
    }
    this.qmp.close();
    await killAndWait(this.pid, this.runDir, this.launched);
    await fsp.rm(this.runDir, { recursive: true, force: true });
  }
}

/** A VM that failed to start is torn down, but its console and QEMU logs are kept for the user to read. */
export async function keepLogs(id: string, runDir: string): Promise<string | undefined> {
  const logsDir = path.join(forkdRunDir(), "logs");
  try {
    await fsp.mkdir(logsDir, { recursive: true, mode: 0o700 });
    const consoleLog = path.join(logsDir, `${id}.console.log`);
    await fsp.copyFile(runtimePaths(runDir).console, consoleLog).catch(() => fsp.writeFile(consoleLog, ""));
    await fsp.copyFile(runtimePaths(runDir).qemuLog, path.join(logsDir, `${id}.qemu.log`)).catch(() => {});
    return consoleLog;
  } catch {
    return undefined;
  }
}

/**
 * Probe the agent until it answers: early probes are queued until the guest opens
 * its port. The probe is a ping unless the caller names another idempotent call
 * (a restored child uses its identity call, saving a round trip under TCG).
 */
export async function waitForAgent(
  socketPath: string,
  timeoutMs: number,
  runDir: string,
  signal?: AbortSignal,
  probe: (agent: AgentClient, timeoutMs: number) => Promise<unknown> = (agent, ms) => agent.ping({ timeoutMs: ms }),
  connected?: AgentClient,
): Promise<AgentClient> {
  const deadline = Date.now() + timeoutMs;
  const agent = connected ?? (await AgentClient.connect(socketPath, { timeoutMs }));
  for (;;) {
    signal?.throwIfAborted();
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      agent.close();
      throw new ForkdError(
        "vm_timeout",
        `the guest agent did not answer within ${timeoutMs} ms; the guest console log is ${runtimePaths(runDir).console}`,
        { console: runtimePaths(runDir).console },
      );
    }
    try {
      await probe(agent, Math.min(remaining, 2000));
      return agent;
    } catch (err) {
      if (agent.isClosed) throw err;
    }
  }
}

async function raceExit<T>(work: Promise<T>, launched: Launched, runDir: string): Promise<T> {
  const exited = launched.exited.then(async ({ code, signal }) => {
    const log = await fsp.readFile(runtimePaths(runDir).qemuLog, "utf8").catch(() => "");
    throw new ForkdError(
      "vm_start_failed",
      `QEMU exited (${signal ?? `code ${code}`}) before the guest was up: ${log.trim().slice(-1500) || "no output"}; console log: ${runtimePaths(runDir).console}`,
    );
  });
  return Promise.race([work, exited]);
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

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
