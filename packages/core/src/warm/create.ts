// Warm snapshots: boot a parent whose RAM lives in a shared file, warm it, save
// only its device state (x-ignore-shared), and register RAM + device state as an
// immutable snapshot that children map copy-on-write.
import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import { Vm } from "../boot/vm.js";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { validateName } from "../common/validate.js";
import { getImage } from "../guest/image.js";
import { assertSnapshotOp, registerSnapshot, type SnapshotInfo, snapshotWorkDirs } from "../store/snapshots.js";
import { migrateToFile } from "../vmm/migration-sink.js";
import { type Accel, CURRENT_MACHINE } from "../vmm/plan.js";

/** How long a parked parent may settle before its device state is saved. */
const SETTLE_BEFORE_SAVE_MS = 250;

export type CreateSnapshotOpts = {
  tag: string;
  image?: string;
  warm?: string[];
  warmEval?: string[];
  memoryMib?: number;
  vcpus?: number;
  accel?: Accel;
  onProgress?: (step: string) => void;
  signal?: AbortSignal;
};

export async function createSnapshot(opts: CreateSnapshotOpts): Promise<SnapshotInfo> {
  const tag = validateName(opts.tag, "tag");
  const progress = opts.onProgress ?? (() => {});
  await assertSnapshotOp(tag, "create");
  const image = await getImage(opts.image ?? "base");
  const started = performance.now();
  const { work, stageWork } = await snapshotWorkDirs();
  const memoryPath = path.join(stageWork, "memory.bin");
  let vm: Vm | undefined;
  try {
    progress("booting the parent");
    const booted = await Vm.boot({
      image: image.name,
      memoryMib: opts.memoryMib ?? 256,
      vcpus: opts.vcpus ?? 1,
      accel: opts.accel,
      network: true,
      memoryPath,
      ephemeral: true,
      signal: opts.signal,
    });
    vm = booted.vm;
    faultPoint("snapshot.parent-booted");
    const bootMs = booted.timings.totalMs;
    const warmStart = performance.now();
    for (const [i, command] of (opts.warm ?? []).entries()) {
      progress(`warm-up command ${i + 1}/${opts.warm!.length}`);
      let output = "";
      const res = await vm.agent.exec(
        { cmd: command, timeoutMs: 600_000 },
        { onStdout: (d) => (output += d), onStderr: (d) => (output += d) },
      );
      if (res.exitCode !== 0) {
        throw new ForkdError(
          "bad_request",
          `warm-up command ${JSON.stringify(command)} failed with ${res.exitCode ?? res.signal}: ${output.slice(-1000)}`,
        );
      }
    }
    for (const [i, code] of (opts.warmEval ?? []).entries()) {
      progress(`warm-up eval ${i + 1}/${opts.warmEval!.length}`);
      await vm.agent.eval(code, { evalTimeoutMs: 600_000 });
    }
    // Run every agent path a child takes right after restore once in the parent, so
    // V8 has parsed and compiled them before the snapshot: a child then pays only
    // for TCG translation, not for lazy JS compilation as well.
    progress("warming the agent");
    await warmAgentPaths(vm, image.runtimes.includes("python"));
    // The agent must be idle and settled when its memory is frozen.
    await vm.agent.ping();
    // Parked, the agent's small C gate reads the port: a child's identity and ping are
    // answered without waking the JavaScript runtime. An agent that cannot park (an
    // older image) still works, only slower to answer first.
    await vm.agent.call({ op: "park" }, { timeoutMs: 10_000 }).catch(() => {});
    // Let the guest fall asleep before its memory is frozen: whatever it is still
    // doing when stopped, every child does again after `cont`, translated afresh.
    await new Promise((r) => setTimeout(r, SETTLE_BEFORE_SAVE_MS));
    const warmMs = performance.now() - warmStart;
    progress("saving device state");
    const saveStart = performance.now();
    const vmstatePath = path.join(work, "vmstate.bin");
    await saveDeviceState(vm, vmstatePath);
    const saveMs = performance.now() - saveStart;
    await vm.destroy();
    vm = undefined;
    progress("writing the memory image");
    return await registerSnapshot({
      work,
      stageWork,
      base: {
        tag,
        image: { name: image.name, digest: image.digest, kernel: image.kernel, initrd: image.initrd, rootfs: image.rootfs },
        kernelVersion: image.kernelVersion,
        accel: booted.vm.accel,
        vcpus: opts.vcpus ?? 1,
        memoryMib: opts.memoryMib ?? 256,
        network: true,
        machine: CURRENT_MACHINE,
        warm: { commands: opts.warm ?? [], evals: opts.warmEval ?? [] },
        parent: null,
        branchedFrom: null,
        timings: { bootMs, warmMs, saveMs, totalMs: performance.now() - started },
      },
    });
  } finally {
    await vm?.destroy();
    await fsp.rm(work, { recursive: true, force: true });
    await fsp.rm(stageWork, { recursive: true, force: true });
  }
}

async function warmAgentPaths(vm: Vm, python: boolean): Promise<void> {
  if (python) {
    // Waits for the worker's interpreter and imports; its answer path is then warm too.
    await vm.agent.eval("None", { language: "python", evalTimeoutMs: 600_000, timeoutMs: 660_000 });
  }
  await vm.agent.identity({ hostname: "forkd", entropy: randomBytes(64).toString("base64"), clockMs: Date.now() });
  await vm.agent.exec({ argv: ["true"] });
  await vm.agent.exec({ cmd: "true" });
  await vm.agent.eval("1 + 1");
  await vm.agent.files({ action: "stat", path: "/" });
  await vm.agent.files({ action: "list", path: "/opt/forkd" });
}

/** Stop the VM and write its device state (RAM in the shared file is skipped) to `target`. */
async function saveDeviceState(vm: Vm, target: string): Promise<void> {
  await vm.qmp.execute("stop", {});
  await vm.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] });
  await migrateToFile(vm.qmp, vm.runDir, target, 600_000, "saving the device state");
}
