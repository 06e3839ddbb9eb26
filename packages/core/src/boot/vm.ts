// One VM = one QEMU process, a private runtime dir, a QMP connection and an agent
// connection. This file boots (cold) and tears down; restoring from a snapshot
// reuses the same pieces.
import fs from "node:fs";
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { UndoStack } from "../common/undo.js";
import type { AgentClient } from "../guest/agent-client.js";
import { waitForAgent } from "../guest/agent-wait.js";
import { getImage, type ImageManifest } from "../guest/image.js";
import { applySandboxEgress, ensureEgressNamespace, removeSandboxEgress } from "../net/netns.js";
import { type AccelChoice, selectAccel } from "../vmm/accel.js";
import { type Accel, guestAppend, runtimePaths, type VmPlan } from "../vmm/plan.js";
import {
  grantToVmm,
  keepLogs,
  killAndWait,
  type Launched,
  launchQemu,
  makeRunDir,
  newSandboxId,
  raceExit,
  removeRunDir,
  runDirUid,
  saveConsole,
} from "../vmm/process.js";
import { QmpClient } from "../vmm/qmp.js";

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
  /** Set by the first destroy: a Vm exists only once booted, so stopped is the one state it can change to. */
  private stopped = false;

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
    // A boot that fails gives back what it took, newest first, every step even if one throws.
    const undo = new UndoStack();
    undo.push("remove the runtime dir", () => removeRunDir(runDir));
    // Unwound after the kill, before the runtime dir goes: QEMU's log is complete only once it exited.
    let kept: string | undefined;
    undo.push("keep the logs for the user", async () => {
      kept = await keepLogs(id, runDir);
    });
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
    let qmp: QmpClient | undefined;
    let agent: AgentClient | undefined;
    try {
      if (opts.memoryPath) grantToVmm(path.dirname(opts.memoryPath), runDir);
      // A VM with a NIC (a snapshot parent, `forkd run`) gets the default egress policy, like a child.
      const netns = plan.network === "user" ? await ensureEgressNamespace() : undefined;
      const uid = runDirUid(runDir);
      if (netns && uid !== undefined) {
        // Pushed before the rules are written: the uid's next holder must not inherit what a half write left.
        undo.push("remove the egress rules", () => removeSandboxEgress(uid));
        await applySandboxEgress(uid, { allowOut: [], denyOut: [] });
      }
      const launched = launchQemu({ plan, dieWithParent: opts.ephemeral ?? false, ...(netns ? { netns } : {}) });
      undo.push("kill the VMM", () => killAndWait(launched.pid, runDir, launched));
      // Unwound first, while QEMU still runs: its console ring buffer is read over QMP.
      undo.push("save the console", async () => {
        const client = qmp ?? (await QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 1000 }).catch(() => undefined));
        try {
          await saveConsole(client, runDir);
        } finally {
          client?.close();
        }
      });
      const t1 = performance.now();
      qmp = await raceExit(QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 10_000, signal: opts.signal }), launched, runDir);
      const t2 = performance.now();
      agent = await raceExit(waitForAgent(runtimePaths(runDir).agent, opts.bootTimeoutMs ?? 60_000, runDir, opts.signal), launched, runDir);
      const t3 = performance.now();
      const vm = new Vm(id, runDir, launched.pid, accel, qmp, agent, launched);
      undo.commit();
      return { vm, image, timings: { launchMs: t1 - t0, qmpMs: t2 - t1, agentMs: t3 - t2, totalMs: t3 - t0 } };
    } catch (err) {
      agent?.close();
      const reported = await undo.rollback(err);
      if (reported instanceof ForkdError && kept) {
        throw new ForkdError(
          reported.code,
          reported.message.replaceAll(runtimePaths(runDir).console, kept),
          { ...reported.details, console: kept },
          { cause: err },
        );
      }
      throw reported;
    }
  }

  /** Stop the VMM for good and remove its runtime dir. Safe to call twice. */
  async destroy(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.agent.close();
    try {
      if (!this.qmp.isClosed) await this.qmp.execute("quit", {}, { timeoutMs: 2000 });
    } catch {
      // Already gone or wedged: the kill below handles both.
    }
    this.qmp.close();
    await killAndWait(this.pid, this.runDir, this.launched);
    await removeRunDir(this.runDir);
  }
}

/** Boot the base image under KVM and wait for its agent: the only proof that this host's KVM runs our guests. */
async function bootProbe(accel: Accel): Promise<"booted" | "failed" | "unavailable"> {
  const image = await getImage("base").catch(() => undefined);
  if (!image) return "unavailable";
  const { vm } = await Vm.boot({ accel, ephemeral: true, bootTimeoutMs: 20_000, network: false });
  await vm.destroy();
  return "booted";
}

/** The accel for this host (KVM only after a probe guest booted under it), or the one `override` names. */
export function chooseAccel(opts: { override?: string } = {}): Promise<AccelChoice> {
  return selectAccel({ override: opts.override, probe: bootProbe });
}
