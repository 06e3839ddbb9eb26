// bench e2b: the unmodified `e2b` npm SDK against a daemon of its own, side by side
// with forkd's own SDK on the same daemon, in one run (interleaved, so both see the
// same load): create → first commands.run('true') answered, fork of 10 → every child
// answering commands.run, and the commands.run round trip.
import { ForkdError } from "@forkd/core";
import { e2bApiKey } from "@forkd/e2b";
import { Controller, Sandbox as ForkdSandbox } from "@forkd/sdk";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { startDaemonUnderTest } from "./daemon-under-test.js";
import { emit, machine, p50, round1 } from "./report.js";

/** forkd's snapshot under E2B's template `base`. */
const BASE_SNAPSHOT_TAG = "e2b-base";

export function registerE2bBench(bench: Command): void {
  bench
    .command("e2b")
    .description(
      "the unmodified e2b SDK against forkd's own SDK on one daemon: Sandbox.create('base') to the first commands.run, fork of 10, commands.run round trip",
    )
    .option("--runs <n>", "creates per SDK (p50 over them)", parseIntOption("--runs"), 20)
    .option("--fork-count <n>", "children per fork", parseIntOption("--fork-count"), 10)
    .option("--fork-runs <n>", "forks per SDK", parseIntOption("--fork-runs"), 3)
    .option("--rtt-runs <n>", "commands.run round trips per SDK", parseIntOption("--rtt-runs"), 50)
    .option("--json", "print JSON")
    .action(async (opts: { runs: number; forkCount: number; forkRuns: number; rttRuns: number; json?: boolean }) => {
      if (opts.runs < 1 || opts.forkRuns < 1 || opts.rttRuns < 1 || opts.forkCount < 1 || opts.forkCount > 64)
        throw new ForkdError("bad_request", "--runs, --fork-runs and --rtt-runs must be positive; --fork-count from 1 to 64");
      const s = spinner("starting a daemon");
      const daemon = await startDaemonUnderTest({ prefix: "bench-e2b" });
      const controller = new Controller({ url: daemon.url, token: daemon.token, requestTimeoutMs: 600_000 });
      try {
        // Loaded here: the E2B SDK is only worth its start-up time to this benchmark.
        const { Sandbox: E2bSandbox } = await import("e2b");
        const e2bOpts = { apiUrl: daemon.url, sandboxUrl: daemon.url, apiKey: e2bApiKey(daemon.token), requestTimeoutMs: 600_000 };
        const forkdOpts = { template: BASE_SNAPSHOT_TAG, controller };
        s.text = "template base (built on first use)";
        await (await E2bSandbox.create("base", e2bOpts)).kill();

        const e2bCreate: number[] = [];
        const forkdCreate: number[] = [];
        for (let i = 0; i < opts.runs; i++) {
          s.text = `create → first run ${i + 1}/${opts.runs}`;
          let t = performance.now();
          const a = await E2bSandbox.create("base", e2bOpts);
          await a.commands.run("true");
          e2bCreate.push(performance.now() - t);
          await a.kill();
          t = performance.now();
          const b = await ForkdSandbox.create(forkdOpts);
          await b.commands.run("true");
          forkdCreate.push(performance.now() - t);
          await b.kill();
        }

        const e2bParent = await E2bSandbox.create("base", e2bOpts);
        const forkdParent = await ForkdSandbox.create(forkdOpts);
        const e2bFork: number[] = [];
        const forkdFork: number[] = [];
        for (let i = 0; i < opts.forkRuns; i++) {
          s.text = `fork ${opts.forkCount} ${i + 1}/${opts.forkRuns}`;
          let t = performance.now();
          const children = await e2bParent.fork({ count: opts.forkCount });
          const started = children.filter((c): c is InstanceType<typeof E2bSandbox> => c instanceof E2bSandbox);
          if (started.length !== opts.forkCount)
            throw new ForkdError("vm_start_failed", `e2b fork: ${children.length - started.length} failed`);
          await Promise.all(started.map((c) => c.commands.run("true")));
          e2bFork.push(performance.now() - t);
          await Promise.all(started.map((c) => c.kill()));
          t = performance.now();
          const own = await forkdParent.fork(opts.forkCount);
          await Promise.all(own.map((c) => c.commands.run("true")));
          forkdFork.push(performance.now() - t);
          await Promise.all(own.map((c) => c.kill()));
        }

        const e2bRtt: number[] = [];
        const forkdRtt: number[] = [];
        for (let i = 0; i < opts.rttRuns; i++) {
          s.text = `commands.run round trip ${i + 1}/${opts.rttRuns}`;
          let t = performance.now();
          await e2bParent.commands.run("true");
          e2bRtt.push(performance.now() - t);
          t = performance.now();
          await forkdParent.commands.run("true");
          forkdRtt.push(performance.now() - t);
        }
        await e2bParent.kill();
        await forkdParent.kill();
        s.stop();

        const m = await machine();
        emit(
          "e2b",
          {
            ...m,
            runs: opts.runs,
            fork_count: opts.forkCount,
            fork_runs: opts.forkRuns,
            rtt_runs: opts.rttRuns,
            e2b_create_first_run_p50_ms: p50(e2bCreate),
            forkd_create_first_run_p50_ms: p50(forkdCreate),
            create_first_run_ratio: Math.round((p50(e2bCreate) / p50(forkdCreate)) * 100) / 100,
            e2b_fork_p50_ms: p50(e2bFork),
            forkd_fork_p50_ms: p50(forkdFork),
            fork_ratio: Math.round((p50(e2bFork) / p50(forkdFork)) * 100) / 100,
            e2b_run_rtt_p50_ms: p50(e2bRtt),
            forkd_run_rtt_p50_ms: p50(forkdRtt),
            run_rtt_delta_ms: round1(p50(e2bRtt) - p50(forkdRtt)),
            load_avg_1m: round1((await import("node:os")).loadavg()[0] ?? 0),
          },
          opts,
        );
      } finally {
        s.stop();
        await controller.close();
        await daemon.stop();
      }
    });
}
