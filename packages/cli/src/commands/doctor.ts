import { runDoctor } from "@forkd/core";
import Table from "cli-table3";
import type { Command } from "commander";

export function registerDoctor(program: Command): void {
  program
    .command("doctor")
    .description("check QEMU, acceleration, guest kernel, images, /dev/shm, confinement, live capture, the egress policy and cgroups")
    .option("--accel <mode>", "check this accel mode instead of the automatic choice")
    .option("--json", "machine-readable output")
    .action(async (opts: { accel?: string; json?: boolean }) => {
      const checks = await runDoctor({ accel: opts.accel });
      if (opts.json) process.stdout.write(`${JSON.stringify(checks, null, 2)}\n`);
      else {
        const table = new Table({
          head: ["CHECK", "STATUS", "DETAIL", "FIX"],
          colWidths: [14, 8, 70, 40],
          wordWrap: true,
          style: { head: [], border: [] },
        });
        for (const c of checks) table.push([c.name, c.status.toUpperCase(), c.detail, c.fix ?? ""]);
        process.stdout.write(`${table.toString()}\n`);
      }
      if (checks.some((c) => c.status === "fail")) process.exitCode = 1;
    });
}
