// jupyter-kernel: a notebook-style session (forkd's persistent Python session in
// the guest, numpy imported in the warm parent) is BRANCHed mid-session with a
// live fork-to-many: three continuations explore different next cells in
// parallel, each starting from the session's variables, and the original
// session goes on with its state untouched.
import { Sandbox } from "@forkd/sdk";
import { exampleArgs, ms, report, round, SANDBOX_LIFETIME_MS, timed } from "../shared/report.js";

const TAG = "jupyter-kernel";

const CELLS = [
  ["scale", "data = data * 2\nfloat(data.sum())"],
  ["shift", "data = data + 1\nfloat(data.sum())"],
  ["sample", "data = data[::2]\nfloat(data.sum())"],
] as const;

async function main(): Promise<void> {
  const args = exampleArgs();
  const sandboxes: Sandbox[] = [];
  const py = (sb: Sandbox, code: string) => sb.runCode(code, { language: "python", timeoutMs: 300_000 });
  try {
    const session = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
    sandboxes.push(session);
    // The session so far: cells that built state worth keeping.
    await py(session, "import numpy as np\ndata = np.arange(1_000_000, dtype=np.float64)\nruns = 1");
    const before = Number((await py(session, "float(data.sum())")).value);
    const branch = await timed(() => session.fork(CELLS.length, { timeoutMs: SANDBOX_LIFETIME_MS }));
    sandboxes.push(...branch.value);
    const results = await Promise.all(branch.value.map(async (child, i) => Number((await py(child, CELLS[i]![1])).value)));
    const after = Number((await py(session, "runs += 1\nfloat(data.sum())")).value);
    if (after !== before) throw new Error(`the original session's data changed: ${before} → ${after}`);
    const expected = [before * 2, before + 1_000_000, before / 2 - 250_000];
    for (const [i, value] of results.entries()) {
      if (Math.abs(value - expected[i]!) > 1e-6 * Math.abs(expected[i]!))
        throw new Error(`continuation ${CELLS[i]![0]} gave ${value}, not ${expected[i]}`);
    }
    report(
      args,
      `jupyter-kernel: a live session with a 1M-element numpy array, branched into ${CELLS.length} continuations`,
      [
        ["BRANCH → 3 continuations running", ms(branch.ms)],
        ["continuations", CELLS.map(([name], i) => `${name}: ${results[i]}`).join("; ")],
        ["original keeps its state", `yes (sum ${before} before and after)`],
      ],
      { jupyter_branch_ms: round(branch.ms), jupyter_continuations: CELLS.length },
    );
  } finally {
    await Promise.allSettled(sandboxes.map((sb) => sb.kill()));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`jupyter-kernel: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
