// Planning a QEMU command line: pure, unit-tested. Launching it is vmm/process.ts.
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";

export type Accel = "kvm" | "tcg";

type MemoryBacking =
  /** Private anonymous RAM: a throwaway VM. */
  | { kind: "anon" }
  /** RAM in a file: share=true for a parent whose RAM becomes the snapshot, false for a copy-on-write child. */
  | { kind: "file"; path: string; share: boolean }
  /**
   * A copy-on-write child of a staged image held as a sealed memfd (forkd-seal-image):
   * `source` is the holder's /proc/PID/fd/3, which the launcher opens as root, checks
   * and hands to QEMU as fd SEALED_MEMORY_FD. QEMU 7.2 opens mem-path read-write even
   * for share=off; the seals, not file modes, are what keep every VMM from writing it.
   */
  | { kind: "sealed"; source: string };

/** The fd a sealed staged image has in its VMM (forkd-vmm-launch's MEMFD_TARGET_FD). */
const SEALED_MEMORY_FD = 100;

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
  /** The machine's device set; a restore must use its snapshot's. The current one by default. */
  machine?: MachineProfile;
};

/**
 * The microvm device set. A snapshot's device state only loads into the same set,
 * so each snapshot records the profile it was made with (manifests from before
 * there were profiles are "v1") and every restore recreates it.
 *  - v1: an i8254 PIT, an i8259 PIC pair, an RTC, the ISA serial console.
 *  - v2: v1 without the PIT and the PIC. The guest times with the TSC and the local
 *    APIC and routes interrupts through the IOAPIC, so it never used either, but
 *    QEMU's PIT keeps its power-on square wave running: a timer in QEMU's main loop
 *    every 27 ms (36 wake-ups a second) in every idle child.
 */
export type MachineProfile = "v1" | "v2";
const MACHINE_PROFILES: readonly MachineProfile[] = ["v1", "v2"];
export const CURRENT_MACHINE: MachineProfile = "v2";

function machineOption(profile: MachineProfile): string {
  if (!MACHINE_PROFILES.includes(profile)) {
    throw new ForkdError(
      "not_supported",
      `the snapshot was made on machine profile '${String(profile)}', which this forkd does not know (it knows ${MACHINE_PROFILES.join(", ")}); use a newer forkd`,
    );
  }
  const base = "microvm,x-option-roms=off,isa-serial=on,rtc=on";
  return profile === "v1" ? base : `${base},pit=off,pic=off`;
}

const LIMITS = {
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

/**
 * The guest kernel's options. An idle guest must not wake up: under TCG every wake-up
 * is host CPU in every child. `nowatchdog` stops the soft-lockup watchdog's 4-second
 * timer, `psi=0` the pressure-stall averaging that re-arms itself every 2 s while
 * anything runs (the other periodic wake-ups are sysctls set by the guest's init).
 */
const BASE_APPEND = "console=ttyS0 panic=-1 quiet reboot=t nowatchdog psi=0";

/**
 * The guest kernel command line. Under TCG the guest's TSC is the host's TSC, but
 * the guest calibrates it against an emulated PIT, and on a loaded host that
 * calibration fails and boot stalls ("tsc: Unable to calibrate against PIT").
 * Telling the guest the host's known TSC rate skips the calibration entirely.
 */
export function guestAppend(accel: Accel, hostCpuinfo: string, extra = setting("append")): string {
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
    machineOption(plan.machine ?? CURRENT_MACHINE),
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
    // After an incoming migration QEMU has the guest announce itself (virtio-net's
    // config interrupt, then gratuitous ARP and IPv6 neighbour adverts, five rounds
    // over about a second): a switch's business, not user-mode networking's, and in a
    // restored child most of what the guest ran before its first answer.
    "-global",
    "migration.announce-rounds=0",
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
  } else if (plan.memory.kind === "sealed") {
    args.push(
      "-object",
      `memory-backend-file,id=mem,size=${size},mem-path=/proc/self/fd/${SEALED_MEMORY_FD},share=off`,
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
