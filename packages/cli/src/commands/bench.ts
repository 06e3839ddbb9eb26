import { chooseAccel, ForkdError, parseAccel, Vm } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, percentile, round1, spinner } from "../ui.js";

export function registerBench(program: Command): void {
  const bench = program.command("bench").description("benchmarks that print a table or JSON");
  bench
    .command("boot")
    .description("cold boot to first agent ping, several runs")
    .option("--runs <n>", "number of boots", parseIntOption("--runs"), 5)
    .option("--image <name>", "guest image", "base")
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print JSON")
    .action(async (opts: { runs: number; image: string; accel?: string; json?: boolean }) => {
      if (opts.runs < 1 || opts.runs > 100) throw new ForkdError("bad_request", "--runs must be from 1 to 100");
      const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
      const samples: number[] = [];
      const s = spinner("cold boots");
      try {
        for (let i = 0; i < opts.runs; i++) {
          s.text = `cold boot ${i + 1}/${opts.runs}`;
          const { vm, timings } = await Vm.boot({ image: opts.image, accel, ephemeral: true });
          samples.push(timings.totalMs);
          await vm.destroy();
        }
      } finally {
        s.stop();
      }
      const result = {
        accel,
        runs: opts.runs,
        boot_to_ping_ms_p50: round1(percentile(samples, 50)),
        boot_to_ping_ms_max: round1(Math.max(...samples)),
        boot_to_ping_ms_min: round1(Math.min(...samples)),
        cpus: (await import("node:os")).cpus().length,
      };
      if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else {
        process.stdout.write(
          `boot → first ping (${accel}, ${opts.runs} runs): p50 ${result.boot_to_ping_ms_p50} ms, min ${result.boot_to_ping_ms_min} ms, max ${result.boot_to_ping_ms_max} ms\n`,
        );
      }
    });
}
