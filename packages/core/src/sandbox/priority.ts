// CPU priority of a sandbox's VMM: "background" for work nobody waits on yet (a hot
// pool refilling), so a user's fork and calls win every contended CPU; "normal" once
// someone holds the sandbox. Each sandbox has its own cgroup, so its weight decides
// between sandboxes; nice on every thread covers a host without the cpu controller.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { cgroupDirs, cpuSettings } from "./cgroup.js";

export type CpuPriority = "normal" | "background";

/** The lowest weight and shares the kernel accepts, and the nicest nice. */
const BACKGROUND = { weight: 1, shares: 2, nice: 19 };

/** The cgroup values for `cpus` CPUs at a priority (pure). */
export function priorityValues(cpus: number, priority: CpuPriority): { weight: number; shares: number; nice: number } {
  if (priority === "background") return BACKGROUND;
  const normal = cpuSettings(cpus);
  return { weight: normal.weight, shares: normal.shares, nice: 0 };
}

/**
 * Best effort: a priority that cannot be set (no cgroup, not root) leaves the
 * sandbox working at the priority it had, which is never a reason to fail it.
 */
export function setSandboxPriority(pid: number, cgroup: string | null | undefined, cpus: number, priority: CpuPriority): void {
  const values = priorityValues(cpus, priority);
  for (const dir of cgroupDirs(cgroup)) {
    for (const [file, value] of [
      ["cpu.weight", values.weight],
      ["cpu.shares", values.shares],
    ] as const) {
      try {
        fs.writeFileSync(path.join(dir, file), String(value));
      } catch {
        // the other cgroup flavour, or a group without the cpu controller
      }
    }
  }
  // A thread's nice is its own (setpriority on a pid changes that thread only); threads
  // QEMU starts later inherit it from the thread that creates them.
  let tids: string[] = [];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return;
  }
  for (const tid of tids) {
    try {
      os.setPriority(Number(tid), values.nice);
    } catch {
      // exited meanwhile, or raising priority back needs a privilege we lack
    }
  }
}
