// ci-parallel-pytest: a pytest suite split across N forks of a parent that has
// already compiled and collected it, against the same suite run serially in one
// sandbox, in the same run. The figure is the wall-time ratio serial / parallel.
import { Sandbox } from "@forkd/sdk";
import { exampleArgs, ms, report, round, SANDBOX_LIFETIME_MS, timed } from "../shared/report.js";

const TAG = "ci-parallel-pytest";
const PYTEST = "cd /opt/recipe/project && python3 -m pytest -q -p no:cacheprovider";

/** "40 passed in 10.2s" → 40. */
function passed(output: string): number {
  return Number(/(\d+) passed/.exec(output)?.[1] ?? 0);
}

async function main(): Promise<void> {
  const args = exampleArgs();
  const n = args.n ?? 10;
  const sandboxes: Sandbox[] = [];
  try {
    const serial = await timed(async () => {
      const sb = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
      sandboxes.push(sb);
      return passed((await sb.commands.run(PYTEST, { timeoutMs: 900_000 })).stdout);
    });
    const parallel = await timed(async () => {
      const forks = await Sandbox.fork(TAG, n, { timeoutMs: SANDBOX_LIFETIME_MS });
      sandboxes.push(...forks);
      const counts = await Promise.all(
        forks.map(async (sb, i) => passed((await sb.commands.run(`${PYTEST} --shard ${i}/${n}`, { timeoutMs: 900_000 })).stdout)),
      );
      return counts.reduce((a, b) => a + b, 0);
    });
    if (parallel.value !== serial.value) throw new Error(`the shards passed ${parallel.value} tests, the serial run ${serial.value}`);
    const ratio = serial.ms / parallel.ms;
    report(
      args,
      `ci-parallel-pytest: ${serial.value} tests, serially in one sandbox vs split across ${n} forks`,
      [
        ["serial, one sandbox", ms(serial.ms)],
        [`${n} forks (fork + run + collect)`, ms(parallel.ms)],
        ["ratio serial / parallel", `${round(ratio, 2)}×`],
      ],
      {
        pytest_parallel_ratio: round(ratio, 2),
        pytest_serial_ms: round(serial.ms),
        pytest_parallel_ms: round(parallel.ms),
        pytest_forks: n,
      },
    );
  } finally {
    await Promise.allSettled(sandboxes.map((sb) => sb.kill()));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`ci-parallel-pytest: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
