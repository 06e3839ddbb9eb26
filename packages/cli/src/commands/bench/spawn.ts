// bench spawn: fork N children from a warm snapshot against cold boots of the same image, in one run.
import { randomBytes } from "node:crypto";
import { chooseAccel, createSnapshot, ForkdError, forkSandboxes, killSandbox, parseAccel, pssBytes, removeSnapshot } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { coldBootsMs, vmmFloorBytes } from "./fixtures.js";
import { emit, MIB, machine, p50, percentile, round1 } from "./report.js";

export function registerSpawnBench(bench: Command): void {
  bench
    .command("spawn")
    .description("fork N children from a warm snapshot; wall time, per-child timings, memory per child, and cold boots side by side")
    .option("-n, --count <n>", "children", parseIntOption("-n"), 100)
    .option("--image <name>", "guest image", "base")
    .option("--memory-mib <n>", "guest memory", parseIntOption("--memory-mib"), 256)
    .option("--concurrency <n>", "restores in flight", parseIntOption("--concurrency"), 8)
    .option("--cold-runs <n>", "cold boots to compare against", parseIntOption("--cold-runs"), 3)
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print JSON")
    .action(
      async (opts: {
        count: number;
        image: string;
        memoryMib: number;
        concurrency: number;
        coldRuns: number;
        accel?: string;
        json?: boolean;
      }) => {
        const n = opts.count;
        if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
        const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
        const tag = `bench-spawn-${randomBytes(4).toString("hex")}`;
        const s = spinner(`snapshot ${tag}`);
        const ids: string[] = [];
        try {
          await createSnapshot({
            tag,
            image: opts.image,
            memoryMib: opts.memoryMib,
            accel,
            onProgress: (step) => (s.text = `snapshot: ${step}`),
          });
          s.text = "measuring a bare VMM";
          const floor = await vmmFloorBytes(tag);
          s.text = `forking ${n}`;
          let done = 0;
          const started = performance.now();
          const results = await forkSandboxes({
            tag,
            n,
            concurrency: opts.concurrency,
            onChild: (r) => {
              if (r.ok) ids.push(r.id);
              s.text = `forking: ${++done}/${n}`;
            },
          });
          const wallMs = performance.now() - started;
          const ok = results.flatMap((r) => (r.ok ? [r] : []));
          s.text = "letting children settle, then reading their memory";
          await new Promise((r) => setTimeout(r, 2000));
          const pss = ok.map((r) => pssBytes(r.pid) ?? 0);
          const pssPerChild = pss.reduce((a, b) => a + b, 0) / Math.max(1, ok.length);
          s.text = "killing children";
          await Promise.all(ids.splice(0).map((id) => killSandbox(id)));
          const cold = await coldBootsMs(opts.coldRuns, opts.image, accel, (i) => (s.text = `cold boot ${i + 1}/${opts.coldRuns}`));
          const coldMs = percentile(cold, 50);
          const perChild = ok.map((r) => r.timings.totalMs);
          const result = {
            ...(await machine(accel)),
            n,
            ok: ok.length,
            concurrency: opts.concurrency,
            memory_mib: opts.memoryMib,
            wall_ms: round1(wallMs),
            vmm_start_ms: p50(ok.map((r) => r.timings.vmmStartMs)),
            restore_ms_p50: p50(ok.map((r) => r.timings.restoreMs)),
            first_answer_ms_p50: p50(ok.map((r) => r.timings.firstAnswerMs)),
            per_child_ms_p50: round1(percentile(perChild, 50)),
            per_child_ms_p99: round1(percentile(perChild, 99)),
            pss_per_child_mib: round1(pssPerChild / MIB),
            vmm_floor_mib: round1(floor / MIB),
            guest_delta_mib: round1((pssPerChild - floor) / MIB),
            cold_boot_ms: round1(coldMs),
            // Per VM: one cold boot against one child's restore-to-answer, both measured in this run.
            speedup_vs_cold: round1(coldMs / percentile(perChild, 50)),
            // Amortised: n cold boots one after another against the whole fan-out.
            fanout_speedup_vs_cold: round1((coldMs * n) / wallMs),
            failures: results.flatMap((r) => (r.ok ? [] : [r.error])),
          };
          s.stop();
          emit("spawn", result, opts);
          if (!opts.json) for (const f of result.failures) process.stdout.write(`failure: ${f.message}\n`);
          if (ok.length < n) process.exitCode = 1;
        } finally {
          s.stop();
          await Promise.all(ids.map((id) => killSandbox(id).catch(() => {})));
          await removeSnapshot(tag, { force: true }).catch(() => {});
        }
      },
    );
}
