// `forkd bench soak` at CI size, through the CLI: a real daemon process does the
// whole workload over and over and must keep nothing it did not hold before.
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { CLI, isolateForkd } from "../helpers/env.js";

isolateForkd();

describe("forkd bench soak", () => {
  it("spawns, execs, evals, moves files, branches and kills 8 times leaking no fd, process or file", () => {
    const run = spawnSync(process.execPath, [CLI, "bench", "soak", "--cycles", "8", "--json"], {
      env: process.env,
      encoding: "utf8",
      timeout: 600_000,
    });
    expect(run.status, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout.trim().split("\n").at(-1)!) as Record<string, unknown>;
    expect(result).toMatchObject({
      cycles: 8,
      failed_cycles: 0,
      leaked_fds: 0,
      leaked_processes: 0,
      leaked_files: 0,
      daemon_alive: true,
    });
    // The baseline is taken with no sandbox alive: nothing of the workload may still run or be open.
    expect(result.processes_end).toBe(result.processes_start);
    expect(result.rss_growth_mib as number).toBeLessThan(128);
  }, 660_000);
});
