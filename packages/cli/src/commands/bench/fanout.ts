// bench fanout: the headline workload, N children each answering from a warm Python worker.
import { randomBytes } from "node:crypto";
import {
  connectSandbox,
  createSnapshot,
  ForkdError,
  forkSandboxes,
  killSandbox,
  listSandboxes,
  pssBytes,
  removeSnapshot,
} from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { emit, MIB, machine, percentile, round1 } from "./report.js";

export function registerFanoutBench(bench: Command): void {
  bench
    .command("fanout")
    .description("the headline workload: N children each evaluating `import numpy; numpy.zeros(5).tolist()` in a warm Python worker")
    .option("-n, --count <n>", "children", parseIntOption("-n"), 100)
    .option("--image <name>", "image with Python", "python")
    .option("--concurrency <n>", "restores in flight", parseIntOption("--concurrency"), 8)
    .option("--json", "print JSON")
    .action(async (opts: { count: number; image: string; concurrency: number; json?: boolean }) => {
      const n = opts.count;
      if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
      const code = "import numpy; numpy.zeros(5).tolist()";
      const expected = JSON.stringify([0, 0, 0, 0, 0]);
      const tag = `bench-fanout-${randomBytes(4).toString("hex")}`;
      const s = spinner(`snapshot of image ${opts.image}`);
      const ids: string[] = [];
      try {
        await createSnapshot({ tag, image: opts.image, onProgress: (step) => (s.text = `snapshot: ${step}`) });
        s.text = `fan-out of ${n}`;
        let answered = 0;
        const evalMs: number[] = [];
        const started = performance.now();
        const answers: Promise<boolean>[] = [];
        await forkSandboxes({
          tag,
          n,
          concurrency: opts.concurrency,
          keepAgent: (id, agent) => {
            ids.push(id);
            answers.push(
              (async () => {
                try {
                  const t0 = performance.now();
                  const res = await agent.eval(code, { language: "python", timeoutMs: 120_000 });
                  evalMs.push(performance.now() - t0);
                  s.text = `fan-out: ${++answered}/${n} answered`;
                  return JSON.stringify(res.value) === expected;
                } catch {
                  return false;
                } finally {
                  agent.close();
                }
              })(),
            );
          },
        });
        const ok = (await Promise.all(answers)).filter(Boolean).length;
        const wallMs = performance.now() - started;
        s.text = "letting children settle, then reading their memory";
        await new Promise((r) => setTimeout(r, 2000));
        const rows = listSandboxes().filter((r) => ids.includes(r.id));
        const pss = rows.map((r) => pssBytes(r.pid) ?? 0);
        // One warm child: the worker's eval against a cold `python3 -c` of the same expression.
        const probe = await connectSandbox(ids[0]!);
        const warm: number[] = [];
        const cold: number[] = [];
        // Evals first: a cold interpreter in between would evict the warm path's translations.
        for (let i = 0; i < 30; i++) {
          s.text = `warm eval ${i + 1}/30`;
          const t0 = performance.now();
          await probe.eval(code, { language: "python" });
          warm.push(performance.now() - t0);
        }
        for (let i = 0; i < 3; i++) {
          s.text = `cold python3 -c ${i + 1}/3`;
          const t0 = performance.now();
          await probe.exec({ argv: ["python3", "-c", "import numpy; print(numpy.zeros(5).tolist())"] });
          cold.push(performance.now() - t0);
        }
        probe.close();
        s.stop();
        const result = {
          ...(await machine()),
          image: opts.image,
          n,
          ok,
          wall_ms: round1(wallMs),
          first_eval_ms_p50: round1(percentile(evalMs, 50)),
          eval_ms_p50: round1(percentile(warm, 50)),
          exec_python_ms_p50: round1(percentile(cold, 50)),
          pss_per_child_mib: round1(pss.reduce((a, b) => a + b, 0) / Math.max(1, pss.length) / MIB),
        };
        emit("fanout", result, opts);
        if (ok < n) process.exitCode = 1;
      } finally {
        s.stop();
        await Promise.all(ids.map((id) => killSandbox(id).catch(() => {})));
        await removeSnapshot(tag, { force: true }).catch(() => {});
      }
    });
}
