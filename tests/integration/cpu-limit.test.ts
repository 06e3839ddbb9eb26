// CPU fairness with real VMs: every sandbox runs under a cgroup CPU quota (its
// vCPUs by default, cpu_limit when asked), so a guest spinning every vCPU is held
// to its quota and its neighbours keep answering.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { cgroupDirs, connectSandbox, forkSandboxes, killSandbox, listSandboxes } from "@forkd/core";
import { Controller, ForkdApiError, Sandbox } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "cpu-fair";
const CLK_TCK = 100;

function forkd(args: string[]) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 300_000, env: process.env });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

/** CPU seconds a process has used (user + system, all its threads), from /proc/PID/stat. */
function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** The sandbox's cgroup dir holding the CPU quota (v1: the cpu hierarchy's; v2: the one dir). */
function cpuCgroup(id: string): string {
  const row = listSandboxes().find((s) => s.id === id)!;
  const dir = cgroupDirs(row.cgroup).find((d) => fs.existsSync(path.join(d, "cpu.cfs_quota_us")) || fs.existsSync(path.join(d, "cpu.max")));
  expect(dir, `sandbox ${id} has no cpu cgroup (cgroup column: ${row.cgroup})`).toBeDefined();
  return dir!;
}

/** [quota, period] in µs, whichever cgroup version holds them. */
function quotaOf(dir: string): [number, number] {
  if (fs.existsSync(path.join(dir, "cpu.max"))) {
    const [quota, period] = fs.readFileSync(path.join(dir, "cpu.max"), "utf8").trim().split(/\s+/);
    return [Number(quota), Number(period)];
  }
  const read = (f: string) => Number(fs.readFileSync(path.join(dir, f), "utf8").trim());
  return [read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")];
}

/** Periods in which the kernel held the group back for using up its quota (cpu.stat, v1 and v2). */
function throttledPeriods(dir: string): number {
  const stat = fs.readFileSync(path.join(dir, "cpu.stat"), "utf8");
  return Number(/^nr_throttled (\d+)$/m.exec(stat)?.[1] ?? Number.NaN);
}

function pidOf(id: string): number {
  return listSandboxes().find((s) => s.id === id)!.pid;
}

beforeAll(() => {
  const res = forkd(["snapshot", "--tag", TAG, "--vcpus", "2"]);
  expect(res.code, res.stderr).toBe(0);
});

afterAll(() => {
  forkd(["kill", "--all"]);
});

describe("a sandbox spinning all its vCPUs", () => {
  it("is held to its cpu_limit while its neighbour still answers quickly", async () => {
    const [spinner] = await forkSandboxes({ tag: TAG, n: 1, cpuLimit: 0.5 });
    const [quiet] = await forkSandboxes({ tag: TAG, n: 1 });
    expect(spinner?.ok, JSON.stringify(spinner)).toBe(true);
    expect(quiet?.ok, JSON.stringify(quiet)).toBe(true);

    const spinDir = cpuCgroup(spinner!.id);
    expect(quotaOf(spinDir)).toEqual([50_000, 100_000]);
    expect(fs.readFileSync(path.join(spinDir, "cgroup.procs"), "utf8").split("\n")).toContain(String(pidOf(spinner!.id)));
    if (fs.existsSync(path.join(spinDir, "cpu.shares")))
      expect(fs.readFileSync(path.join(spinDir, "cpu.shares"), "utf8").trim()).toBe("512");
    // Without cpu_limit a sandbox still gets a quota: its vCPUs.
    const quietDir = cpuCgroup(quiet!.id);
    expect(quotaOf(quietDir)).toEqual([200_000, 100_000]);

    const agent = await connectSandbox(spinner!.id);
    try {
      // One busy loop per vCPU, detached so exec returns at once.
      const res = await agent.exec({ cmd: "for i in 1 2; do sh -c 'while :; do :; done' >/dev/null 2>&1 & done" });
      expect(res.exitCode).toBe(0);
    } finally {
      agent.close();
    }
    await new Promise((r) => setTimeout(r, 500));
    const pid = pidOf(spinner!.id);
    const before = cpuSeconds(pid);
    const throttledBefore = throttledPeriods(spinDir);
    const t0 = performance.now();
    const quietAgent = await connectSandbox(quiet!.id);
    const pings: number[] = [];
    try {
      while (performance.now() - t0 < 3000) {
        const p0 = performance.now();
        await quietAgent.ping();
        pings.push(performance.now() - p0);
        await new Promise((r) => setTimeout(r, 200));
      }
    } finally {
      quietAgent.close();
    }
    const used = (cpuSeconds(pid) - before) / ((performance.now() - t0) / 1000);
    // Spinning (so the measure is not idle), and capped at its half CPU (plus the kernel's accounting slack).
    expect(used).toBeGreaterThan(0.3);
    expect(used).toBeLessThanOrEqual(0.6);
    // The cap is what held it there, not the neighbours' load: the kernel throttled it.
    expect(throttledPeriods(spinDir) - throttledBefore, `used ${used.toFixed(2)} CPU`).toBeGreaterThan(5);
    const sorted = [...pings].sort((a, b) => a - b);
    expect(sorted[Math.floor(sorted.length / 2)]!, `pings: ${pings.map((p) => p.toFixed(0)).join(", ")} ms`).toBeLessThan(250);

    await killSandbox(spinner!.id);
    await killSandbox(quiet!.id);
    expect(fs.existsSync(spinDir)).toBe(false);
    expect(fs.existsSync(quietDir)).toBe(false);
  });

  it("refuses cpu limits that mean nothing, naming the option", () => {
    for (const bad of ["0", "-1", "abc", "100000"]) {
      const res = forkd(["fork", "--tag", TAG, "--cpu-limit", bad]);
      expect(res.code, bad).toBe(2);
      expect(res.stderr, bad).toMatch(/--cpu-limit must be a number of CPUs/);
    }
    expect(forkd(["ls", "--json"]).stdout.trim()).toBe("[]");
  });
});

describe("cpu_limit through the daemon and the SDK", () => {
  let daemon: DaemonHandle;
  let controller: Controller;
  beforeAll(async () => {
    daemon = await startDaemonProcess(env.runDir);
    controller = new Controller({ url: daemon.url, token: daemon.token });
  });
  afterAll(async () => {
    if (daemon) await stopDaemon(daemon);
  });

  it("answers 400 naming cpu_limit for values out of range", async () => {
    for (const bad of [0, -0.5, 0.001, 100_000]) {
      const err = (await controller.createSandboxes({ snapshot_tag: TAG, cpu_limit: bad }).catch((e: unknown) => e)) as ForkdApiError;
      expect(err, String(bad)).toBeInstanceOf(ForkdApiError);
      expect(err.status, String(bad)).toBe(400);
      expect(err.message).toMatch(/^cpu_limit must be a number of CPUs from 0\.01 to \d+/);
    }
    expect(await controller.listSandboxes()).toEqual([]);
  });

  it("applies the SDK's cpuLimit as the sandbox's quota", async () => {
    const [sandbox] = await Sandbox.fork(TAG, 1, { cpuLimit: 0.25, controller });
    expect(quotaOf(cpuCgroup(sandbox!.sandboxId))).toEqual([25_000, 100_000]);
    expect((await sandbox!.commands.run("echo ok")).stdout).toBe("ok\n");
    await sandbox!.kill();
  });
});
