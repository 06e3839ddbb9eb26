// Hot pools, the parts without a VM: which forks a pooled child may stand for, the
// CPU priority a refill runs at, and the sizes a caller may ask for.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError, poolCanServe, priorityValues, setSandboxPriority, validatePoolSize } from "@forkd/core";
import { describe, expect, it } from "vitest";

describe("which forks the pool serves", () => {
  it("a fork with the defaults a pool is restored with", () => {
    expect(poolCanServe({})).toBe(true);
    expect(poolCanServe({ network: true, memoryLimitMib: null, allowOut: [], denyOut: [] })).toBe(true);
  });

  it("never one asking for what a pooled child was not given", () => {
    expect(poolCanServe({ memoryLimitMib: 256 })).toBe(false);
    expect(poolCanServe({ cpuLimit: 0.5 })).toBe(false);
    expect(poolCanServe({ network: false })).toBe(false);
    expect(poolCanServe({ allowOut: ["10.0.0.0/8"] })).toBe(false);
    expect(poolCanServe({ denyOut: ["1.1.1.1"] })).toBe(false);
  });
});

describe("refill priority", () => {
  it("is the lowest weight, shares and nice in the background, a sandbox's own otherwise", () => {
    expect(priorityValues(1, "background")).toEqual({ weight: 1, shares: 2, nice: 19 });
    expect(priorityValues(1, "normal")).toEqual({ weight: 100, shares: 1024, nice: 0 });
    expect(priorityValues(2, "normal")).toEqual({ weight: 200, shares: 2048, nice: 0 });
  });

  it("writes the cgroup's weight and shares, and sets nice on every thread", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-prio-"));
    try {
      fs.writeFileSync(path.join(dir, "cpu.shares"), "1024");
      setSandboxPriority(process.pid, dir, 1, "background");
      expect(fs.readFileSync(path.join(dir, "cpu.shares"), "utf8")).toBe("2");
      expect(fs.readFileSync(path.join(dir, "cpu.weight"), "utf8")).toBe("1");
      const tids = fs.readdirSync(`/proc/${process.pid}/task`).map(Number);
      for (const tid of tids) expect(os.getPriority(tid), `thread ${tid}`).toBe(19);
      setSandboxPriority(process.pid, dir, 1, "normal");
      expect(fs.readFileSync(path.join(dir, "cpu.shares"), "utf8")).toBe("1024");
      // Raising priority back needs CAP_SYS_NICE; without it the sandbox keeps working where it was.
      if (process.geteuid?.() === 0) for (const tid of tids) expect(os.getPriority(tid)).toBe(0);
    } finally {
      for (const tid of fs.readdirSync(`/proc/${process.pid}/task`).map(Number)) {
        try {
          os.setPriority(tid, 0);
        } catch {
          // not root: this test process stays niced, which harms nothing
        }
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("pool sizes", () => {
  it("are whole numbers from 0 up to the sandbox limit, named in the refusal", async () => {
    for (const bad of [-1, 1.5, Number.NaN, "3", 1001]) {
      const err = await validatePoolSize("t", bad, { maxSandboxes: 2000 }).catch((e: unknown) => e);
      expect(err, String(bad)).toBeInstanceOf(ForkdError);
      expect((err as ForkdError).code).toBe("bad_request");
    }
    const over = await validatePoolSize("t", 11, { maxSandboxes: 10 }).catch((e: unknown) => e);
    expect((over as ForkdError).message).toMatch(/more than this daemon's limit of 10 sandboxes \(--max-sandboxes\)/);
    expect((over as ForkdError).details).toMatchObject({ limit: "max_sandboxes", max_sandboxes: 10 });
  });
});
