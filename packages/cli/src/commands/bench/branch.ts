// bench branch: pause, time until forkable and total time of each BRANCH mode by guest
// size and workload, through a real daemon; for each mode and workload, how the
// pause at the largest size compares with the smallest (live must stay flat: it
// copies only the pages the guest wrote, whatever its RAM size).
import { randomBytes } from "node:crypto";
import { type Controller, ForkdApiError } from "@forkd/sdk";
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
    .option("--sizes <list>", "guest memory sizes in MiB", "256,1024,2048")
    .option("--modes <list>", "modes", "live,diff,full")
    .option("--workloads <list>", "idle and/or dirty", "idle,dirty")
    .option("--dirty-mib <n>", "MiB the dirty workload rewrites in a loop (default: a quarter of guest RAM)", parseIntOption("--dirty-mib"))
    .option("--json", "print JSON")
    .action(
      async (opts: {
        samples: number;
        nowaitSamples: number;
        sizes: string;
        modes: string;
        workloads: string;
        dirtyMib?: number;
        json?: boolean;
      }) => {
        const sizes = opts.sizes.split(",").map((x) => Number(x));
        const modes = opts.modes.split(",") as ("live" | "diff" | "full")[];
        const workloads = opts.workloads.split(",") as ("idle" | "dirty")[];
        const s = spinner("starting a daemon");
        const { controller, stop } = await startBenchDaemon();
        const run = randomBytes(3).toString("hex");
        const rows: (Row & Record<string, unknown>)[] = [];
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
                const mib = opts.dirtyMib ?? Math.floor(memoryMib / 4);
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
                const readies: number[] = [];
                for (let i = 0; i < opts.nowaitSamples; i++) {
                  s.text = `${memoryMib} MiB ${workload} ${mode}: wait:false ${i + 1}/${opts.nowaitSamples}`;
                  const tag = `${base}-${workload}-${mode}-nw${i}`;
                  const t0 = performance.now();
                  await controller.branchSandbox(source, { tag, mode, wait: false });
                  returns.push(performance.now() - t0);
                  readies.push((await firstFork(controller, tag)) - t0);
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
                  ready_to_fork_ms_p50: round1(percentile(readies, 50)),
                  ...(workload === "dirty" ? { dirty_mib: opts.dirtyMib ?? Math.floor(memoryMib / 4) } : {}),
                  samples: pauses.length,
                });
              }
              await controller.deleteSandbox(source);
            }
          }
          s.stop();
          const result = { ...(await machine()), results: rows, pause_ratios: pauseRatios(rows) };
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
              "READY TO FORK p50",
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
                r.ready_to_fork_ms_p50,
              ] as string[]);
            const ratios = plainTable(["MODE", "WORKLOAD", "PAUSE p50 LARGEST / SMALLEST"]);
            for (const r of result.pause_ratios)
              ratios.push([
                r.mode,
                r.workload,
                `${r.ratio} (${r.largest_mib} MiB ${r.largest_p50} ms / ${r.smallest_mib} MiB ${r.smallest_p50} ms)`,
              ]);
            return `${table.toString()}\n${ratios.toString()}\n${fieldsTable(result)}`;
          });
        } finally {
          s.stop();
          for (const tag of cleanupTags) await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
          await stop();
        }
      },
    );
}

/**
 * When a fork of `tag` was first accepted (performance.now()), forked right away and
 * again until it is: a live BRANCH's capture is forkable as soon as the call returns,
 * the other modes once their snapshot is registered. The child is removed again.
 */
async function firstFork(controller: Controller, tag: string): Promise<number> {
  for (const deadline = Date.now() + 600_000; Date.now() < deadline; ) {
    const attempt = performance.now();
    const forked = await controller.createSandboxes({ snapshot_tag: tag, n: 1 }).catch((err: unknown) => {
      if (err instanceof ForkdApiError && err.status === 409) return undefined;
      throw err;
    });
    if (forked) {
      for (const child of forked) await controller.deleteSandbox(child.id);
      return attempt;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`snapshot ${tag} could not be forked within 600 s`);
}

type Row = { mode: string; workload: string; memory_mib: number; pause_ms_p50: number };

/** For each mode and workload measured at more than one size: the p50 pause at the largest size over the smallest. */
function pauseRatios(rows: Row[]): {
  mode: string;
  workload: string;
  smallest_mib: number;
  largest_mib: number;
  smallest_p50: number;
  largest_p50: number;
  ratio: number;
}[] {
  const groups = new Map<string, Row[]>();
  for (const r of rows) groups.set(`${r.mode}/${r.workload}`, [...(groups.get(`${r.mode}/${r.workload}`) ?? []), r]);
  const out = [];
  for (const group of groups.values()) {
    if (group.length < 2) continue;
    const sorted = [...group].sort((a, b) => a.memory_mib - b.memory_mib);
    const small = sorted[0]!;
    const large = sorted[sorted.length - 1]!;
    out.push({
      mode: small.mode,
      workload: small.workload,
      smallest_mib: small.memory_mib,
      largest_mib: large.memory_mib,
      smallest_p50: small.pause_ms_p50,
      largest_p50: large.pause_ms_p50,
      ratio: Math.round((large.pause_ms_p50 / small.pause_ms_p50) * 100) / 100,
    });
  }
  return out;
}
