// `forkd bench chaos` at CI size, through the CLI: a real daemon is killed with
// SIGKILL inside random operations and restarted; recovery must leave nothing
// behind. A correctness check (every count 0), not a timing one.
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { CLI, isolateForkd } from "../helpers/env.js";

isolateForkd();

describe("forkd bench chaos", () => {
  it("kills the daemon 4 times at random moments of random operations and finds no half snapshot, orphan VMM, paused source, lost sandbox or leftover file", () => {
    const run = spawnSync(process.execPath, [CLI, "bench", "chaos", "--kills", "4", "--seed", "14", "--json"], {
      env: process.env,
      encoding: "utf8",
      timeout: 600_000,
    });
    expect(run.status, `${run.stdout}\n${run.stderr}`).toBe(0);
    const result = JSON.parse(run.stdout.trim().split("\n").at(-1)!) as Record<string, unknown>;
    expect(result).toMatchObject({
      kills: 4,
      half_snapshots: 0,
      orphan_vmms: 0,
      paused_sources: 0,
      lost_sandboxes: 0,
      leftover_files: 0,
      findings: [],
    });
    const ops = result.ops as Record<string, number>;
    expect(Object.values(ops).reduce((a, b) => a + b, 0)).toBe(4);
    expect(result).toHaveProperty("cpu_model");
    expect(["kvm", "tcg"]).toContain(result.accel);
  }, 660_000);
});
