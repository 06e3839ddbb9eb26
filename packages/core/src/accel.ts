import fs from "node:fs";
import { ForkdError } from "./errors.js";
import type { Accel } from "./qemu.js";

export type AccelChoice = { accel: Accel; reason: string };

/** What the CPU and /dev/kvm allow; pure given its inputs, so it is unit-tested. */
export function accelFromHost(cpuinfo: string, kvmUsable: boolean): AccelChoice {
  const flags = new Set((/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? "").trim().split(/\s+/));
  if (!flags.has("vmx") && !flags.has("svm")) {
    return {
      accel: "tcg",
      reason:
        "the CPU advertises neither vmx nor svm (this host is itself a VM without nested virtualization; /dev/kvm here runs only PVM guests), so guests run under TCG",
    };
  }
  if (!kvmUsable) return { accel: "tcg", reason: "the CPU has hardware virtualization but /dev/kvm is missing or not read-writable" };
  return { accel: "kvm", reason: "the CPU has hardware virtualization and /dev/kvm is usable" };
}

export function parseAccel(value: string): Accel {
  if (value === "kvm" || value === "tcg") return value;
  throw new ForkdError("bad_request", `--accel must be 'kvm' or 'tcg', got '${value}'`);
}

function kvmUsable(): boolean {
  try {
    fs.accessSync("/dev/kvm", fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export type ProbeBoot = (accel: Accel) => Promise<boolean>;

let cached: AccelChoice | undefined;

/**
 * KVM only where the CPU has vmx/svm and a probe guest really boots under it
 * (a host that is itself a guest may expose /dev/kvm that cannot run our kernel);
 * TCG otherwise. FORKD_ACCEL or --accel overrides.
 */
export async function chooseAccel(opts: { override?: string; probe?: ProbeBoot } = {}): Promise<AccelChoice> {
  const override = opts.override ?? process.env.FORKD_ACCEL;
  if (override) return { accel: parseAccel(override), reason: `chosen explicitly (${opts.override ? "--accel" : "FORKD_ACCEL"})` };
  if (cached) return cached;
  const fromHost = accelFromHost(fs.readFileSync("/proc/cpuinfo", "utf8"), kvmUsable());
  if (fromHost.accel === "kvm" && opts.probe) {
    const booted = await opts.probe("kvm").catch(() => false);
    cached = booted
      ? { accel: "kvm", reason: `${fromHost.reason}, and a probe guest booted under KVM` }
      : { accel: "tcg", reason: "KVM looked usable but a probe guest failed to boot under it, so guests run under TCG" };
    return cached;
  }
  cached = fromHost;
  return cached;
}
