import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { cgroupDirs, cpuSettings, detectCgroups, readCpuLimit, validateCpuLimit } from "@forkd/core";
import { describe, expect, it } from "vitest";

describe("CPU limits", () => {
  it("turn CPUs into a CFS quota and a weight in proportion", () => {
    expect(cpuSettings(0.5)).toEqual({ quotaUs: 50_000, periodUs: 100_000, shares: 512, weight: 50 });
    expect(cpuSettings(2)).toEqual({ quotaUs: 200_000, periodUs: 100_000, shares: 2048, weight: 200 });
    // The kernel's floors: 1 ms of quota, 2 shares, weight 1.
    expect(cpuSettings(0.001)).toMatchObject({ quotaUs: 1000, shares: 2, weight: 1 });
  });

  it("refuse what means nothing, naming the field", () => {
    expect(validateCpuLimit(0.5, "cpu_limit", 2)).toBe(0.5);
    expect(validateCpuLimit(2, "cpu_limit", 2)).toBe(2);
    for (const bad of [0, -1, 0.001, 2.5, Number.NaN, Number.POSITIVE_INFINITY, "1", null]) {
      expect(() => validateCpuLimit(bad, "cpu_limit", 2), String(bad)).toThrow(
        /^cpu_limit must be a number of CPUs from 0\.01 to 2 \(this host's CPUs\), fractions allowed, got /,
      );
    }
    expect(() => validateCpuLimit(0, "--cpu-limit", 4)).toThrow(/^--cpu-limit must be .* to 4 /);
  });
});

describe("a sandbox's cgroup record", () => {
  it("reads one dir (v2, older rows) or a list (one per v1 hierarchy)", () => {
    expect(cgroupDirs(null)).toEqual([]);
    expect(cgroupDirs("/sys/fs/cgroup/forkd/sb-1")).toEqual(["/sys/fs/cgroup/forkd/sb-1"]);
    expect(cgroupDirs('["/sys/fs/cgroup/memory/forkd/sb-1","/sys/fs/cgroup/cpu/forkd/sb-1"]')).toEqual([
      "/sys/fs/cgroup/memory/forkd/sb-1",
      "/sys/fs/cgroup/cpu/forkd/sb-1",
    ]);
  });

  it("gives back the CPU limit from either cgroup version's files", () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-cg-"));
    try {
      const v2 = path.join(root, "v2");
      fs.mkdirSync(v2);
      fs.writeFileSync(path.join(v2, "cpu.max"), "25000 100000\n");
      expect(readCpuLimit(v2)).toBe(0.25);
      fs.writeFileSync(path.join(v2, "cpu.max"), "max 100000\n");
      expect(readCpuLimit(v2)).toBeUndefined();
      const mem = path.join(root, "memory");
      const cpu = path.join(root, "cpu");
      fs.mkdirSync(mem);
      fs.mkdirSync(cpu);
      fs.writeFileSync(path.join(cpu, "cpu.cfs_quota_us"), "150000\n");
      fs.writeFileSync(path.join(cpu, "cpu.cfs_period_us"), "100000\n");
      expect(readCpuLimit(JSON.stringify([mem, cpu]))).toBe(1.5);
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  it("finds v1 hierarchies per controller and v2's controllers", () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-cg-"));
    try {
      expect(detectCgroups(root)).toBeUndefined();
      fs.mkdirSync(path.join(root, "cpu,cpuacct"));
      fs.writeFileSync(path.join(root, "cpu,cpuacct", "cpu.cfs_quota_us"), "-1\n");
      expect(detectCgroups(root)).toEqual({ version: 1, memory: undefined, cpu: path.join(root, "cpu,cpuacct") });
      fs.writeFileSync(path.join(root, "cgroup.controllers"), "cpuset cpu io memory pids\n");
      expect(detectCgroups(root)).toEqual({ version: 2, root, memory: true, cpu: true });
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});
