// `forkd bench fuzz` at CI size, through the CLI: requests generated from the
// daemon's own OpenAPI document and mutated, against a daemon with live
// sandboxes. Bad input must get a 4xx, and the daemon must still answer after.
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { CLI, isolateForkd } from "../helpers/env.js";

isolateForkd();

describe("forkd bench fuzz", () => {
  it("answers 800 generated, mutated requests without a 5xx and keeps answering", () => {
    const run = spawnSync(process.execPath, [CLI, "bench", "fuzz", "--requests", "800", "--json"], {
      env: process.env,
      encoding: "utf8",
      timeout: 600_000,
    });
    const result = JSON.parse(run.stdout.trim().split("\n").at(-1) ?? "{}") as Record<string, unknown>;
    expect(result.examples_5xx, run.stderr).toEqual([]);
    expect(run.status, run.stderr).toBe(0);
    expect(result).toMatchObject({ requests: 800, responses_5xx: 0, daemon_alive: true, daemon_answering: true, sandboxes_answering: 2 });
    // Every request got an answer, and the mutations reached the routes: most are refused, some go through.
    expect(result.no_answer).toBe(0);
    expect(result.responses_4xx as number).toBeGreaterThan(400);
    expect(result.responses_2xx as number).toBeGreaterThan(50);
  }, 660_000);
});
