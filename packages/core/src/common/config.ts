import path from "node:path";

/** Where durable state lives (images, snapshots, the database): survives reboots. */
export function forkdHome(): string {
  return path.resolve(process.env.FORKD_HOME ?? "/var/lib/forkd");
}

/** Where per-VM runtime dirs (sockets, pid files, console logs) live: gone after a reboot, as they should be. */
export function forkdRunDir(): string {
  return path.resolve(process.env.FORKD_RUN_DIR ?? "/run/forkd");
}

export function imagesDir(): string {
  return path.join(forkdHome(), "images");
}

export function vmsRunDir(): string {
  return path.join(forkdRunDir(), "vms");
}

export function qemuBinary(accel: "kvm" | "tcg"): string {
  if (process.env.FORKD_QEMU) return process.env.FORKD_QEMU;
  return accel === "kvm" ? "/usr/bin/qemu-system-x86_64-microvm" : "/usr/bin/qemu-system-x86_64";
}

export function snapshotsDir(): string {
  return path.join(forkdHome(), "snapshots");
}

/** Staged memory images live on shmem: children map them privately, and live BRANCH needs shmem for write-protect. */
export function shmDir(): string {
  return path.resolve(process.env.FORKD_SHM_DIR ?? "/dev/shm/forkd");
}

/** How much staged memory images may take on tmpfs before the least recently used idle one is evicted. */
export function stageBudgetBytes(): number {
  const mib = Number(process.env.FORKD_STAGE_BUDGET_MIB ?? 8192);
  return (Number.isFinite(mib) && mib > 0 ? mib : 8192) * 2 ** 20;
}
