// bench boot: cold boot to the first agent answer, the baseline every fork figure is set against.
import { chooseAccel, ForkdError, parseAccel } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { coldBootsMs } from "./fixtures.js";
import { emit, machine, p50, round1 } from "./report.js";

export function registerBootBench(bench: Command): void {
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
      const s = spinner("cold boots");
      let samples: number[];
      try {
        samples = await coldBootsMs(opts.runs, opts.image, accel, (i) => (s.text = `cold boot ${i + 1}/${opts.runs}`));
      } finally {
        s.stop();
      }
      const result = {
        ...(await machine(accel)),
        runs: opts.runs,
        boot_to_ping_ms_p50: p50(samples),
        boot_to_ping_ms_max: round1(Math.max(...samples)),
        boot_to_ping_ms_min: round1(Math.min(...samples)),
      };
      emit("boot", result, opts);
    });
}
