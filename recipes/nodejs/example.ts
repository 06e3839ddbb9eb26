// nodejs: a warm Node.js runtime with a project's node_modules already loaded.
// A fork requires the project (already in the warm context's module cache) and
// runs a function; the cold way starts a new Node process that requires it from
// disk and runs the same function, in a sandbox of the same kind.
import { Sandbox } from "@forkd/sdk";
import { exampleArgs, median, ms, report, round, SANDBOX_LIFETIME_MS, timed } from "../shared/report.js";

const TAG = "nodejs";
const N_ORDERS = 10_000;

async function main(): Promise<void> {
  const args = exampleArgs();
  const n = args.n ?? 3;
  const sandboxes: Sandbox[] = [];
  try {
    const forks: number[] = [];
    let answer = "";
    for (let i = 0; i < n; i++) {
      const { value, ms: took } = await timed(async () => {
        const sb = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
        sandboxes.push(sb);
        const res = await sb.runCode(`JSON.stringify(require('/opt/recipe/project/index.js').run(${N_ORDERS}))`);
        return String(res.value);
      });
      forks.push(took);
      answer = value;
    }
    const coldBox = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
    sandboxes.push(coldBox);
    const cold = await timed(async () =>
      (await coldBox.commands.run(`/opt/forkd/bin/node /opt/recipe/project/cli.js ${N_ORDERS}`)).stdout.trim(),
    );
    if (cold.value !== answer) throw new Error(`the cold run answered ${cold.value}, the forks ${answer}`);
    const forkMs = median(forks);
    report(
      args,
      `nodejs: ${n} forks, each requiring the project (lodash, semver, js-yaml) and running it over ${N_ORDERS} orders`,
      [
        ["fork → require + run (median)", `${ms(forkMs)}  (each: ${forks.map(ms).join(", ")})`],
        ["cold: new node process, require + run", ms(cold.ms)],
        ["speed-up", `${round(cold.ms / forkMs)}×`],
      ],
      { node_fork_run_ms: round(forkMs), node_cold_ms: round(cold.ms), node_forks: n },
    );
  } finally {
    await Promise.allSettled(sandboxes.map((sb) => sb.kill()));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`nodejs: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
