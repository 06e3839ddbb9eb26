// Planning a QEMU command line: pure, unit-tested. Launching it is vmm/process.ts.
import path from "node:path";
import { ForkdError } from "../common/errors.js";

export type Accel = "kvm" | "tcg";

export type MemoryBacking =
  /** Private anonymous RAM: a throwaway VM. */
  | { kind: "anon" }
  /** RAM in a file: share=true for a parent whose RAM becomes the snapshot, false for a copy-on-write child. */
  | { kind: "file"; path: string; share: boolean };

export type VmPlan = {
  accel: Accel;
  memoryMib: number;
  vcpus: number;
  runDir: string;
  rootfs: string;
  memory: MemoryBacking;
  /** Cold boot: kernel + initrd + command line. Absent for a restore. */
  boot?: { kernel: string; initrd: string; append: string };
  /**
   * Restore: start with `-incoming defer`; the caller sets x-ignore-shared and
   * points migrate-incoming at the device-state stream on an inherited fd (QEMU
   * 7.2 has no command-line property for that capability).
   */
  incoming?: boolean;
  /** -S: stay paused after loading (a materializer must not let the guest run). */
  startPaused?: boolean;
  /** none: no NIC; user: outbound user-mode networking; isolated: the NIC exists (a snapshot's device set must match) but reaches nothing. */
  network: "none" | "user" | "isolated";
  tbSizeMib?: number;
};

export const LIMITS = {
  memoryMib: { min: 128, max: 64 * 1024 },
  vcpus: { min: 1, max: 64 },
} as const;

export function runtimePaths(runDir: string) {
  return {
    qmp: path.join(runDir, "qmp.sock"),
    agent: path.join(runDir, "agent.sock"),
    console: path.join(runDir, "console.log"),
    qemuLog: path.join(runDir, "qemu.log"),
    pidfile: path.join(runDir, "qemu.pid"),
  };
}

/** Size of the console ring buffer (a power of two, as QEMU requires). */
export const CONSOLE_RING_BYTES = 256 * 1024;

export const BASE_APPEND = "console=ttyS0 panic=-1 quiet reboot=t";

/**
 * The guest kernel command line. Under TCG the guest's TSC is the host's TSC, but
 * the guest calibrates it against an emulated PIT, and on a loaded host that
 * calibration fails and boot stalls ("tsc: Unable to calibrate against PIT").
 * Telling the guest the host's known TSC rate skips the calibration entirely.
 */
export function guestAppend(accel: Accel, hostCpuinfo: string, extra = process.env.FORKD_APPEND): string {
  if (extra) return extra;
  const parts = [BASE_APPEND];
  if (accel === "tcg") {
    const flags = /^flags\s*:(.*)$/m.exec(hostCpuinfo)?.[1] ?? "";
    const mhz = Number(/^cpu MHz\s*:\s*([\d.]+)/m.exec(hostCpuinfo)?.[1]);
    if (/\bconstant_tsc\b/.test(flags) && /\bnonstop_tsc\b/.test(flags) && Number.isFinite(mhz) && mhz > 100) {
      parts.push(`tsc_early_khz=${Math.round(mhz * 1000)}`, "tsc=reliable");
    }
  }
  return parts.join(" ");
}

export function validateResources(memoryMib: number, vcpus: number): void {
  if (!Number.isInteger(memoryMib) || memoryMib < LIMITS.memoryMib.min || memoryMib > LIMITS.memoryMib.max) {
    throw new ForkdError(
      "bad_request",
      `memory must be a whole number of MiB from ${LIMITS.memoryMib.min} to ${LIMITS.memoryMib.max}, got ${memoryMib}`,
    );
  }
  if (!Number.isInteger(vcpus) || vcpus < LIMITS.vcpus.min || vcpus > LIMITS.vcpus.max) {
    throw new ForkdError("bad_request", `vcpus must be a whole number from ${LIMITS.vcpus.min} to ${LIMITS.vcpus.max}, got ${vcpus}`);
  }
}

/** The argv for one VM. Every value comes from forkd itself or was validated; no shell ever sees it. */
export function buildQemuArgs(plan: VmPlan): string[] {
  validateResources(plan.memoryMib, plan.vcpus);
  const paths = runtimePaths(plan.runDir);
  const size = `${plan.memoryMib}M`;
  const args = [
    "-M",
    "microvm,x-option-roms=off,isa-serial=on,rtc=on",
    ...(plan.accel === "kvm" ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", `tcg,tb-size=${plan.tbSizeMib ?? 64}`, "-cpu", "max"]),
    "-smp",
    String(plan.vcpus),
    "-m",
    size,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    // The console is a ring buffer inside QEMU: a guest that prints forever costs
    // CONSOLE_RING_BYTES, never disk; forkd saves it to console.log when a VM fails.
    "-chardev",
    `ringbuf,id=console,size=${CONSOLE_RING_BYTES}`,
    "-serial",
    "chardev:console",
    // QEMU's own seccomp filter: no exec (so no exec: migration URIs), no privilege
    // or resource-control syscalls, no obsolete ones.
    "-sandbox",
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-pidfile",
    paths.pidfile,
    "-qmp",
    `unix:${paths.qmp},server=on,wait=off`,
    "-device",
    "virtio-serial-device",
    "-chardev",
    `socket,id=agent,path=${paths.agent},server=on,wait=off`,
    "-device",
    "virtserialport,chardev=agent,name=forkd.agent",
    "-drive",
    `file=${plan.rootfs},format=raw,if=none,id=root,readonly=on`,
    "-device",
    "virtio-blk-device,drive=root",
    "-object",
    "rng-random,id=rng0,filename=/dev/urandom",
    "-device",
    "virtio-rng-device,rng=rng0",
  ];
  if (plan.memory.kind === "file") {
    args.push(
      "-object",
      `memory-backend-file,id=mem,size=${size},mem-path=${plan.memory.path},share=${plan.memory.share ? "on" : "off"}`,
      "-numa",
      "node,memdev=mem",
    );
  }
  if (plan.network !== "none") {
    args.push("-netdev", `user,id=net0${plan.network === "isolated" ? ",restrict=on" : ""}`, "-device", "virtio-net-device,netdev=net0");
  }
  if (plan.boot) {
    args.push("-kernel", plan.boot.kernel, "-initrd", plan.boot.initrd, "-append", plan.boot.append);
  }
  if (plan.incoming) args.push("-incoming", "defer");
  if (plan.startPaused) args.push("-S");
  return args;
}
