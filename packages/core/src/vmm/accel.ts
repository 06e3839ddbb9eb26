import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { forkdHome, qemuBinary } from "../common/config.js";
import { ensureStateDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";
import type { Accel } from "./plan.js";

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

/**
 * Boots a probe guest under the given accel: "booted" when its agent answered,
 * "failed" when it did not, "unavailable" when there is nothing to probe with yet.
 * Booting needs an image, so the layer that can boot supplies it.
 */
export type ProbeBoot = (accel: Accel) => Promise<"booted" | "failed" | "unavailable">;

let cached: AccelChoice | undefined;

/** The probe result is kept per host kernel and QEMU binary, so only the first command on a host pays for it. */
function probeCacheFile(): string {
  return path.join(forkdHome(), "accel-probe.json");
}

function probeKey(): string {
  let qemu = "";
  try {
    qemu = String(fs.statSync(qemuBinary("kvm")).mtimeMs);
  } catch {
    // no KVM binary: the probe will fail and say so
  }
  return `${os.release()} ${qemu}`;
}

/**
 * KVM only where the CPU has vmx/svm and a probe guest really boots under it
 * (a host that is itself a guest may expose /dev/kvm that cannot run our kernel);
 * TCG otherwise. FORKD_ACCEL or --accel overrides.
 */
export async function selectAccel(opts: { override?: string; probe: ProbeBoot }): Promise<AccelChoice> {
  const override = opts.override ?? setting("accel");
  if (override) return { accel: parseAccel(override), reason: `chosen explicitly (${opts.override ? "--accel" : "FORKD_ACCEL"})` };
  if (cached) return cached;
  const fromHost = accelFromHost(fs.readFileSync("/proc/cpuinfo", "utf8"), kvmUsable());
  if (fromHost.accel !== "kvm") {
    cached = fromHost;
    return cached;
  }
  const key = probeKey();
  try {
    const saved = JSON.parse(fs.readFileSync(probeCacheFile(), "utf8")) as { key: string; choice: AccelChoice };
    if (saved.key === key) {
      cached = saved.choice;
      return cached;
    }
  } catch {
    // no probe yet
  }
  const outcome = await opts.probe("kvm").catch(() => "failed" as const);
  if (outcome === "unavailable") {
    // Nothing to probe with yet: decide again once an image exists.
    return { accel: "tcg", reason: "KVM looks usable but no image is built to probe it with yet (forkd image build); TCG until then" };
  }
  const booted = outcome === "booted";
  cached = booted
    ? { accel: "kvm", reason: `${fromHost.reason}, and a probe guest booted under KVM` }
    : {
        accel: "tcg",
        reason: "KVM looked usable but a probe guest failed to boot under it (or no image is built yet), so guests run under TCG",
      };
  try {
    ensureStateDir();
    fs.writeFileSync(probeCacheFile(), JSON.stringify({ key, choice: cached }));
  } catch {
    // an unwritable home only costs a probe next time
  }
  return cached;
}
