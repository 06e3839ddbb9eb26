import path from "node:path";
import { setting } from "./settings.js";

/** Where durable state lives (images, snapshots, the database): survives reboots. */
export function forkdHome(): string {
  return setting("home");
}

/** Where per-VM runtime dirs (sockets, pid files, console logs) live: gone after a reboot, as they should be. */
export function forkdRunDir(): string {
  return setting("runDir");
}

export function imagesDir(): string {
  return path.join(forkdHome(), "images");
}

export function vmsRunDir(): string {
  return path.join(forkdRunDir(), "vms");
}

export function qemuBinary(accel: "kvm" | "tcg"): string {
  return setting("qemu") ?? (accel === "kvm" ? "/usr/bin/qemu-system-x86_64-microvm" : "/usr/bin/qemu-system-x86_64");
}

export function snapshotsDir(): string {
  return path.join(forkdHome(), "snapshots");
}

/** Staged memory images live on shmem: children map them privately, and live BRANCH needs shmem for write-protect. */
export function shmDir(): string {
  return setting("shmDir");
}

/** How much staged memory images may take on tmpfs before the least recently used idle one is evicted. */
export function stageBudgetBytes(): number {
  return setting("stageBudgetMib") * 2 ** 20;
}
