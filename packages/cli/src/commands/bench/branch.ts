// bench branch: pause and total time of each BRANCH mode by guest size and workload, through a real daemon.
import { randomBytes } from "node:crypto";
import type { Command } from "commander";
import { parseIntOption, plainTable, spinner } from "../../ui.js";
import { startBenchDaemon } from "./fixtures.js";
import { emit, fieldsTable, machine, percentile, round1 } from "./report.js";

export function registerBranchBench(bench: Command): void {
  bench
    .command("branch")
    .description("BRANCH pause and total time for each mode, guest memory size and workload (idle, or dirtying memory as fast as it can)")
    .option("--samples <n>", "consecutive BRANCHes of one source per row", parseIntOption("--samples"), 6)
    .option("--nowait-samples <n>", "wait:false BRANCHes per row", parseIntOption("--nowait-samples"), 2)
    .option("--sizes <list>", "guest memory sizes in MiB", "256,1024")
    .option("--modes <list>", "modes", "live,diff,full")
    .option("--workloads <list>", "idle and/or dirty", "idle,dirty")
    .option("--json", "print JSON")
    .action(async (opts: { samples: number; nowaitSamples: number; sizes: string; modes: string; workloads: string; json?: boolean }) => {
      const sizes = opts.sizes.split(",").map((x) => Number(x));
      const modes = opts.modes.split(",") as ("live" | "diff" | "full")[];
      const workloads = opts.workloads.split(",") as ("idle" | "dirty")[];
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const run = randomBytes(3).toString("hex");
      const rows: Record<string, unknown>[] = [];
      const cleanupTags: string[] = [];
      try {
        for (const memoryMib of sizes) {
          const base = `bench-br-${run}-${memoryMib}`;
          s.text = `snapshot ${memoryMib} MiB`;
          await controller.createSnapshot({ tag: base, memory_mib: memoryMib });
          cleanupTags.push(base);
          for (const workload of workloads) {
            const source = (await controller.createSandboxes({ snapshot_tag: base, n: 1 }))[0]!.id;
            if (workload === "dirty") {
              // Rewrite a quarter of guest RAM on tmpfs in a loop, detached from the exec.
              const mib = Math.floor(memoryMib / 4);
              await controller.exec(source, {
                cmd: `setsid sh -c 'while true; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=${mib} 2>/dev/null; done' </dev/null >/dev/null 2>&1 &`,
              });
              await new Promise((r) => setTimeout(r, 1500));
            }
            for (const mode of modes) {
              const pauses: number[] = [];
              const totals: number[] = [];
              for (let i = 0; i < opts.samples; i++) {
                s.text = `${memoryMib} MiB ${workload} ${mode}: branch ${i + 1}/${opts.samples}`;
                const tag = `${base}-${workload}-${mode}-${i}`;
                const res = await controller.branchSandbox(source, { tag, mode });
                pauses.push(res.pause_ms ?? Number.NaN);
                totals.push(res.total_ms ?? Number.NaN);
                await controller.deleteSnapshot(tag, { force: true });
              }
              const returns: number[] = [];
              for (let i = 0; i < opts.nowaitSamples; i++) {
                s.text = `${memoryMib} MiB ${workload} ${mode}: wait:false ${i + 1}/${opts.nowaitSamples}`;
                const tag = `${base}-${workload}-${mode}-nw${i}`;
                const t0 = performance.now();
                await controller.branchSandbox(source, { tag, mode, wait: false });
                returns.push(performance.now() - t0);
                await controller.waitForSnapshot(tag);
                await controller.deleteSnapshot(tag, { force: true });
              }
              rows.push({
                mode,
                memory_mib: memoryMib,
                workload,
                pause_ms_p50: round1(percentile(pauses, 50)),
                pause_ms_p90: round1(percentile(pauses, 90)),
                pause_ms_max: round1(Math.max(...pauses)),
                total_ms_p50: round1(percentile(totals, 50)),
                nowait_return_ms_p50: round1(percentile(returns, 50)),
                samples: pauses.length,
              });
            }
            await controller.deleteSandbox(source);
          }
        }
        s.stop();
        const result = { ...(await machine()), results: rows };
        emit("branch", result, opts, () => {
          const table = plainTable([
            "MODE",
            "MEMORY",
            "WORKLOAD",
            "PAUSE p50",
            "PAUSE p90",
            "PAUSE max",
            "TOTAL p50",
            "NO-WAIT RETURN p50",
          ]);
          for (const r of rows)
            table.push([
              r.mode,
              `${r.memory_mib} MiB`,
              r.workload,
              r.pause_ms_p50,
              r.pause_ms_p90,
              r.pause_ms_max,
              r.total_ms_p50,
              r.nowait_return_ms_p50,
            ] as string[]);
          return `${table.toString()}\n${fieldsTable(result)}`;
        });
      } finally {
        s.stop();
        for (const tag of cleanupTags) await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
        await stop();
      }
    });
}
