// Per-sandbox memory limits: cgroup v2 memory.max where the unified hierarchy
// has the memory controller, v1 memory.limit_in_bytes otherwise.
import fs from "node:fs";
import path from "node:path";
import { ForkdError } from "../common/errors.js";

export type CgroupFlavor = { version: 2; root: string } | { version: 1; root: string } | undefined;

export function detectCgroup(root = "/sys/fs/cgroup"): CgroupFlavor {
  try {
    const controllers = fs.readFileSync(path.join(root, "cgroup.controllers"), "utf8");
    if (controllers.split(/\s+/).includes("memory")) return { version: 2, root };
  } catch {
    // not a v2 root
  }
  if (fs.existsSync(path.join(root, "memory", "memory.limit_in_bytes"))) return { version: 1, root: path.join(root, "memory") };
  return undefined;
}

/** Create the sandbox's cgroup with its limit and move `pid` into it; returns the cgroup dir. */
export function limitMemory(id: string, pid: number, limitMib: number, flavor = detectCgroup()): string {
  if (!flavor) {
    throw new ForkdError(
      "not_supported",
      "no memory cgroup is mounted on this host, so --memory-limit-mib cannot be enforced; `forkd doctor` shows cgroup status",
    );
  }
  const parent = path.join(flavor.root, "forkd");
  fs.mkdirSync(parent, { recursive: true });
  if (flavor.version === 2) {
    // Children of a v2 cgroup get the memory controller only if the parent delegates it.
    for (const dir of [flavor.root, parent]) {
      try {
        fs.writeFileSync(path.join(dir, "cgroup.subtree_control"), "+memory");
      } catch {
        // already enabled, or not ours to change; the write of memory.max below tells
      }
    }
  }
  const dir = path.join(parent, id);
  fs.mkdirSync(dir, { recursive: true });
  const bytes = String(limitMib * 2 ** 20);
  if (flavor.version === 2) fs.writeFileSync(path.join(dir, "memory.max"), bytes);
  else fs.writeFileSync(path.join(dir, "memory.limit_in_bytes"), bytes);
  fs.writeFileSync(path.join(dir, "cgroup.procs"), String(pid));
  return dir;
}

export function readMemoryLimit(dir: string): number | undefined {
  for (const file of ["memory.max", "memory.limit_in_bytes"]) {
    try {
      return Number(fs.readFileSync(path.join(dir, file), "utf8").trim());
    } catch {
      // try the other flavour
    }
  }
  return undefined;
}

/**
 * Remove a sandbox cgroup once its processes are gone. The kernel may report the
 * group busy for a moment after its last process exited, so retry briefly.
 */
export async function removeCgroup(dir: string | null | undefined, waitMs = 2000): Promise<void> {
  if (!dir) return;
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      fs.rmdirSync(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code !== "EBUSY" || Date.now() > deadline) return;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
