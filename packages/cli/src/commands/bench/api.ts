// bench api: round trips through a real daemon process, and a spawn through the API against the direct path.
import { randomBytes } from "node:crypto";
import { forkSandboxes, killSandbox } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { startBenchDaemon } from "./fixtures.js";
import { emit, machine, percentile, round1 } from "./report.js";

export function registerApiBench(bench: Command): void {
  bench
    .command("api")
    .description("round trips through a real daemon process: eval of 1+1, exec of true, and one spawn against the direct path")
    .option("--evals <n>", "eval round trips", parseIntOption("--evals"), 200)
    .option("--execs <n>", "exec round trips", parseIntOption("--execs"), 30)
    .option("--spawns <n>", "single-child spawns on each path", parseIntOption("--spawns"), 3)
    .option("--json", "print JSON")
    .action(async (opts: { evals: number; execs: number; spawns: number; json?: boolean }) => {
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const tag = `bench-api-${randomBytes(4).toString("hex")}`;
      const created: string[] = [];
      try {
        s.text = "snapshot";
        await controller.createSnapshot({ tag });
        const apiSpawn: number[] = [];
        const directSpawn: number[] = [];
        for (let i = 0; i < opts.spawns; i++) {
          s.text = `spawn ${i + 1}/${opts.spawns} through the API`;
          const t0 = performance.now();
          const res = await controller.createSandboxes({ snapshot_tag: tag, n: 1 });
          apiSpawn.push(performance.now() - t0);
          created.push(...res.map((c) => c.id));
          s.text = `spawn ${i + 1}/${opts.spawns} directly`;
          const t1 = performance.now();
          const [direct] = await forkSandboxes({ tag, n: 1 });
          directSpawn.push(performance.now() - t1);
          if (direct?.ok) await killSandbox(direct.id);
        }
        const id = created[0]!;
        // Warm the path once, as a client that has used its sandbox before would have.
        for (let i = 0; i < 5; i++) await controller.eval(id, { code: "1+1" });
        await controller.exec(id, { argv: ["true"] });
        const evalRtt: number[] = [];
        for (let i = 0; i < opts.evals; i++) {
          if (i % 20 === 0) s.text = `eval ${i}/${opts.evals}`;
          const t0 = performance.now();
          await controller.eval(id, { code: "1+1" });
          evalRtt.push(performance.now() - t0);
        }
        const execRtt: number[] = [];
        for (let i = 0; i < opts.execs; i++) {
          s.text = `exec ${i}/${opts.execs}`;
          const t0 = performance.now();
          await controller.exec(id, { argv: ["true"] });
          execRtt.push(performance.now() - t0);
        }
        s.stop();
        const result = {
          ...(await machine()),
          transport: "unix socket",
          eval_rtt_ms_p50: round1(percentile(evalRtt, 50)),
          eval_rtt_ms_p99: round1(percentile(evalRtt, 99)),
          exec_rtt_ms_p50: round1(percentile(execRtt, 50)),
          exec_rtt_ms_p99: round1(percentile(execRtt, 99)),
          api_spawn_ms_p50: round1(percentile(apiSpawn, 50)),
          direct_spawn_ms_p50: round1(percentile(directSpawn, 50)),
          rest_spawn_overhead_ms: round1(percentile(apiSpawn, 50) - percentile(directSpawn, 50)),
        };
        emit("api", result, opts);
      } finally {
        s.stop();
        for (const id of created) await controller.deleteSandbox(id).catch(() => {});
        await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
        await stop();
      }
    });
}
