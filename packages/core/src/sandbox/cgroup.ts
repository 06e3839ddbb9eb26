// Per-sandbox resource limits through cgroups: memory (v2 memory.max, v1
// memory.limit_in_bytes) and CPU (v2 cpu.max + cpu.weight, v1 cfs quota +
// shares). Every sandbox gets a CPU quota (by default its vCPUs), so one guest
// spinning all its vCPUs cannot starve the other sandboxes or the daemon.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError } from "../common/errors.js";

/** Where each controller lives: one unified v2 tree, or one v1 hierarchy per controller. */
export type CgroupLayout =
  | { version: 2; root: string; memory: boolean; cpu: boolean }
  | { version: 1; memory: string | undefined; cpu: string | undefined };

export function detectCgroups(root = "/sys/fs/cgroup"): CgroupLayout | undefined {
  try {
    const controllers = fs.readFileSync(path.join(root, "cgroup.controllers"), "utf8").split(/\s+/);
    return { version: 2, root, memory: controllers.includes("memory"), cpu: controllers.includes("cpu") };
  } catch {
    // not a v2 root
  }
  const v1 = (names: string[], file: string) => names.map((n) => path.join(root, n)).find((d) => fs.existsSync(path.join(d, file)));
  const memory = v1(["memory"], "memory.limit_in_bytes");
  const cpu = v1(["cpu", "cpu,cpuacct"], "cpu.cfs_quota_us");
  if (!memory && !cpu) return undefined;
  return { version: 1, memory, cpu };
}

/** The CFS period every quota is expressed in: 100 ms, the kernel's default. */
const CPU_PERIOD_US = 100_000;
/** The kernel refuses quotas under 1 ms a period. */
const MIN_CPU_LIMIT = 0.01;

/** A CPU limit is a number of CPUs, fractions allowed, up to the host's count (a larger quota limits nothing). */
export function validateCpuLimit(value: unknown, field = "cpu_limit", hostCpus = os.availableParallelism()): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value < MIN_CPU_LIMIT || value > hostCpus) {
    throw new ForkdError(
      "bad_request",
      `${field} must be a number of CPUs from ${MIN_CPU_LIMIT} to ${hostCpus} (this host's CPUs), fractions allowed, got ${String(value)}`,
      { field },
    );
  }
  return value;
}

export type CpuSettings = { quotaUs: number; periodUs: number; shares: number; weight: number };

/**
 * Quota and weight for `cpus` CPUs: the quota caps the sandbox, the weight (v1
 * shares, v2 weight) splits contended CPU in proportion to each sandbox's limit.
 */
export function cpuSettings(cpus: number): CpuSettings {
  const clamp = (v: number, lo: number, hi: number) => Math.min(hi, Math.max(lo, Math.round(v)));
  return {
    quotaUs: clamp(cpus * CPU_PERIOD_US, 1000, Number.MAX_SAFE_INTEGER),
    periodUs: CPU_PERIOD_US,
    shares: clamp(cpus * 1024, 2, 262_144),
    weight: clamp(cpus * 100, 1, 10_000),
  };
}

export type SandboxLimits = {
  memoryMib?: number;
  /** CPUs the sandbox may use. */
  cpus: number;
  /** The user asked for this CPU limit: a host without the cpu controller is then an error, not a skipped default. */
  cpusRequested?: boolean;
};

function enableV2(root: string, parent: string, controllers: string[]): void {
  // Children of a v2 cgroup get a controller only if every ancestor delegates it.
  for (const dir of [root, parent]) {
    for (const c of controllers) {
      try {
        fs.writeFileSync(path.join(dir, "cgroup.subtree_control"), `+${c}`);
      } catch {
        // already enabled, or not ours to change; the writes of the limits tell
      }
    }
  }
}

function makeGroup(hierarchy: string, id: string): string {
  const dir = path.join(hierarchy, "forkd", id);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

/**
 * Create the sandbox's cgroup(s) with its memory and CPU limits and move `pid`
 * in. Returns what the sandbox row keeps (see cgroupDirs), or undefined when
 * nothing was limited (no memory limit asked and no cpu controller on the host).
 */
export function limitSandbox(id: string, pid: number, limits: SandboxLimits, layout = detectCgroups()): string | undefined {
  const wantMemory = limits.memoryMib !== undefined;
  const hasMemory = layout?.version === 2 ? layout.memory : Boolean(layout?.memory);
  const hasCpu = layout?.version === 2 ? layout.cpu : Boolean(layout?.cpu);
  if (wantMemory && !hasMemory) {
    throw new ForkdError(
      "not_supported",
      "no memory cgroup is mounted on this host, so --memory-limit-mib cannot be enforced; `forkd doctor` shows cgroup status",
    );
  }
  if (limits.cpusRequested && !hasCpu) {
    throw new ForkdError(
      "not_supported",
      "no cpu cgroup is mounted on this host, so cpu_limit cannot be enforced; `forkd doctor` shows cgroup status",
    );
  }
  if (!layout || (!wantMemory && !hasCpu)) return undefined;
  const cpu = cpuSettings(limits.cpus);
  const memoryBytes = wantMemory ? String(limits.memoryMib! * 2 ** 20) : undefined;
  const dirs: string[] = [];
  try {
    if (layout.version === 2) {
      enableV2(layout.root, path.join(layout.root, "forkd"), [...(wantMemory ? ["memory"] : []), ...(hasCpu ? ["cpu"] : [])]);
      const dir = makeGroup(layout.root, id);
      dirs.push(dir);
      if (memoryBytes) fs.writeFileSync(path.join(dir, "memory.max"), memoryBytes);
      if (hasCpu) {
        fs.writeFileSync(path.join(dir, "cpu.max"), `${cpu.quotaUs} ${cpu.periodUs}`);
        fs.writeFileSync(path.join(dir, "cpu.weight"), String(cpu.weight));
      }
      fs.writeFileSync(path.join(dir, "cgroup.procs"), String(pid));
    } else {
      if (memoryBytes && layout.memory) {
        const dir = makeGroup(layout.memory, id);
        dirs.push(dir);
        fs.writeFileSync(path.join(dir, "memory.limit_in_bytes"), memoryBytes);
        fs.writeFileSync(path.join(dir, "cgroup.procs"), String(pid));
      }
      if (layout.cpu) {
        const dir = makeGroup(layout.cpu, id);
        dirs.push(dir);
        fs.writeFileSync(path.join(dir, "cpu.cfs_period_us"), String(cpu.periodUs));
        fs.writeFileSync(path.join(dir, "cpu.cfs_quota_us"), String(cpu.quotaUs));
        fs.writeFileSync(path.join(dir, "cpu.shares"), String(cpu.shares));
        fs.writeFileSync(path.join(dir, "cgroup.procs"), String(pid));
      }
    }
  } catch (err) {
    for (const dir of dirs) {
      try {
        fs.rmdirSync(dir);
      } catch {
        // holds the process: removed with the sandbox
      }
    }
    throw new ForkdError("io_error", `could not put sandbox ${id} under its cgroup limits: ${(err as Error).message}`, {}, { cause: err });
  }
  return dirs.length === 1 ? dirs[0] : JSON.stringify(dirs);
}

/**
 * Where limitSandbox puts a sandbox's groups, known from its id alone: for a
 * sandbox whose starter died between making the group and recording it.
 */
export function sandboxCgroupDirs(id: string, layout = detectCgroups()): string {
  if (!layout) return JSON.stringify([]);
  const hierarchies = layout.version === 2 ? [layout.root] : [layout.memory, layout.cpu].filter((h): h is string => Boolean(h));
  return JSON.stringify([...new Set(hierarchies)].map((h) => path.join(h, "forkd", id)));
}

/** The cgroup dirs a sandbox row names: one path (v2, or older rows), or a JSON list (one per v1 hierarchy). */
export function cgroupDirs(value: string | null | undefined): string[] {
  if (!value) return [];
  if (value.startsWith("[")) {
    try {
      const parsed: unknown = JSON.parse(value);
      if (Array.isArray(parsed)) return parsed.filter((d): d is string => typeof d === "string");
    } catch {
      return [];
    }
  }
  return [value];
}

/** The CPUs a sandbox's quota allows, from its cgroup files; undefined when it has none. */
export function readCpuLimit(value: string | null | undefined): number | undefined {
  for (const dir of cgroupDirs(value)) {
    try {
      const [quota, period] = fs.readFileSync(path.join(dir, "cpu.max"), "utf8").trim().split(/\s+/);
      if (quota === "max") return undefined;
      return Number(quota) / Number(period);
    } catch {
      // not v2
    }
    try {
      const quota = Number(fs.readFileSync(path.join(dir, "cpu.cfs_quota_us"), "utf8").trim());
      const period = Number(fs.readFileSync(path.join(dir, "cpu.cfs_period_us"), "utf8").trim());
      return quota > 0 ? quota / period : undefined;
    } catch {
      // not the cpu hierarchy
    }
  }
  return undefined;
}

/**
 * Remove a sandbox's cgroups once its processes are gone. The kernel may report a
 * group busy for a moment after its last process exited, so retry briefly.
 */
export async function removeCgroup(value: string | null | undefined, waitMs = 2000): Promise<void> {
  const deadline = Date.now() + waitMs;
  for (const dir of cgroupDirs(value)) {
    for (;;) {
      try {
        fs.rmdirSync(dir);
        break;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT" || code !== "EBUSY" || Date.now() > deadline) break;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }
}
