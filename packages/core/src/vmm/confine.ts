// How each QEMU is confined: its own unprivileged uid from a reserved range, the
// shared VMM group (the one way to read what VMMs must read), no capabilities,
// no_new_privs, QEMU's own seccomp filter (plan.ts), and a private mount view in
// which forkd's state, the other VMs' runtime dirs and the host's secrets do not
// exist. Planning is pure; forkd-vmm-launch (native/) applies it before exec.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { forkdHome, forkdRunDir, shmDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";
import type { VmPlan } from "./plan.js";

/** uids handed to VMMs: no account needed, above the ranges distributions and container tools hand out. */
export const VMM_UID_BASE = 2_013_265_920;
export const VMM_UID_COUNT = 65_536;
/** The group every VMM has: images are readable through it (staged memory reaches a VMM only as a sealed memfd). */
export const VMM_GID = VMM_UID_BASE - 1;

export type Confinement = {
  uid: number;
  gid: number;
  /** Extra groups (kvm, to open /dev/kvm). */
  groups: number[];
  /** Network namespace to enter (a path such as /run/netns/NAME). */
  netns?: string;
  hide: string[];
  expose: string[];
  /** A sealed staged image to hand over (the holder's /proc/PID/fd/3). */
  memfd?: string;
};

/** Off only when asked: FORKD_CONFINE=off (the doctor then reports a failed check). */
export function confinementEnabled(): boolean {
  return setting("confine") === "on";
}

/** Where forkd-vmm-launch is built: core's dist (`npm run build`), named from the package root so it is found from src/vmm (tests) as from dist/vmm. */
export function launcherPath(): string {
  return setting("vmmLaunch") ?? fileURLToPath(new URL("../../dist/forkd-vmm-launch", import.meta.url));
}

/** Host paths no VMM may see, whatever it was started for. */
export function hiddenPaths(): string[] {
  const extra = setting("confineHide");
  return [forkdHome(), forkdRunDir(), shmDir(), "/root", "/home", "/etc/shadow", "/etc/gshadow", "/etc/forkd", ...extra];
}

/** What a VMM needs to see: its runtime dir, its image, its memory file's dir. */
export function exposedPaths(plan: VmPlan): string[] {
  const paths = [plan.runDir, path.dirname(plan.rootfs)];
  if (plan.boot) paths.push(path.dirname(plan.boot.kernel), path.dirname(plan.boot.initrd));
  if (plan.memory.kind === "file") paths.push(path.dirname(plan.memory.path));
  return [...new Set(paths.map((p) => path.resolve(p)))];
}

export function planConfinement(plan: VmPlan, uid: number, opts: { netns?: string; kvmGid?: number } = {}): Confinement {
  if (!Number.isInteger(uid) || uid < VMM_UID_BASE || uid >= VMM_UID_BASE + VMM_UID_COUNT) {
    throw new ForkdError("internal", `VMM uid ${uid} is outside forkd's reserved range`);
  }
  return {
    uid,
    gid: VMM_GID,
    groups: [VMM_GID, ...(plan.accel === "kvm" && opts.kvmGid !== undefined ? [opts.kvmGid] : [])],
    ...(opts.netns ? { netns: opts.netns } : {}),
    hide: hiddenPaths(),
    expose: exposedPaths(plan),
    ...(plan.memory.kind === "sealed" ? { memfd: plan.memory.source } : {}),
  };
}

/** The launcher's argv before the VMM's own; `parentPid` is who it must die with (this process). */
export function launcherArgs(c: Confinement, dieWithParent: boolean, parentPid = process.pid): string[] {
  const args = ["--uid", String(c.uid), "--gid", String(c.gid), "--groups", c.groups.join(",")];
  if (c.netns) args.push("--netns", c.netns);
  for (const p of c.hide) args.push("--hide", p);
  for (const p of c.expose) args.push("--expose", p);
  if (c.memfd) args.push("--memfd", c.memfd);
  if (dieWithParent) args.push("--parent-pid", String(parentPid), "--die-with-parent");
  args.push("--");
  return args;
}

/** The group that owns /dev/kvm, so a KVM guest's VMM may open it. */
export function kvmGroup(): number | undefined {
  try {
    return fs.statSync("/dev/kvm").gid;
  } catch {
    return undefined;
  }
}
