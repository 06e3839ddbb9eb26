// bench recipes: each recipe's own number against its cold way, measured by
// running its example (`forkd recipe run NAME --json`) in this one run. A
// recipe that is not built (without --build), does not exist, or fails leaves
// its fields out, and `absent` says why: a number is never made up.
import os from "node:os";
import { ForkdError, loadRecipe } from "@forkd/core";
import type { Command } from "commander";
import { openBackend } from "../../backend.js";
import { buildRecipe, compiledExample, daemonForExamples, defaultRecipesDir, recipeStatus, runExample } from "../../recipes.js";
import { parseIntOption, spinner } from "../../ui.js";
import { emit, machine } from "./report.js";

/** Which recipe measures which field, in the order they run. */
const FIELDS: readonly { recipe: string; fields: readonly string[] }[] = [
  { recipe: "postgres-fixture", fields: ["postgres_fork_query_ms", "postgres_cold_ms"] },
  { recipe: "nodejs", fields: ["node_fork_run_ms", "node_cold_ms"] },
  { recipe: "tree-search", fields: ["tree_branches_per_min", "tree_cold_per_min"] },
  { recipe: "ci-parallel-pytest", fields: ["pytest_parallel_ratio", "pytest_serial_ms", "pytest_parallel_ms"] },
  { recipe: "jupyter-kernel", fields: ["jupyter_branch_ms"] },
  { recipe: "headless-browser", fields: ["browser_fork_shot_ms", "browser_cold_ms"] },
];

export function registerRecipesBench(bench: Command): void {
  bench
    .command("recipes")
    .description("run each built recipe's example and report its number against the cold way (absent fields say why)")
    .option("--dir <dir>", "the recipes directory (default: the repository's recipes/)")
    .option("--only <names>", "comma-separated recipe names")
    .option("--build", "build recipes that are not built yet (minutes each under TCG)")
    .option("-n, --count <n>", "scale passed to each example (--n)", parseIntOption("-n"))
    .option("--json", "print JSON")
    .action(async (opts: { dir?: string; only?: string; build?: boolean; count?: number; json?: boolean }) => {
      const dir = opts.dir ?? defaultRecipesDir();
      const only = opts.only?.split(",").filter(Boolean);
      for (const name of only ?? []) {
        if (!FIELDS.some((f) => f.recipe === name)) throw new ForkdError("bad_request", `--only: no benchmarked recipe '${name}'`);
      }
      const backend = await openBackend();
      const result: Record<string, unknown> = { ...(await machine()), load_1m_start: Math.round(os.loadavg()[0]! * 100) / 100 };
      const absent: Record<string, string> = {};
      const s = spinner("recipes");
      let daemon: Awaited<ReturnType<typeof daemonForExamples>> | undefined;
      try {
        for (const { recipe: name, fields } of FIELDS) {
          const skip = (why: string) => {
            for (const f of fields) absent[f] = why;
          };
          if (only && !only.includes(name)) {
            skip("not asked for (--only)");
            continue;
          }
          try {
            const recipe = await loadRecipe(dir, name);
            const status = await recipeStatus(recipe, backend);
            if (!status.built && !opts.build) {
              skip(`recipe ${name} is not built (${status.reason}); run \`forkd recipe build ${name}\` or pass --build`);
              continue;
            }
            if (!status.built) await buildRecipe(dir, name, backend, { onProgress: (step) => (s.text = `${name}: ${step}`) });
            daemon ??= await daemonForExamples(backend);
            s.text = `${name}: running its example`;
            const run = await runExample(
              compiledExample(dir, recipe),
              ["--json", ...(opts.count ? ["--n", String(opts.count)] : [])],
              daemon.env,
              { capture: true },
            );
            const line = run.stdout
              .split("\n")
              .filter((l) => l.startsWith("{"))
              .at(-1);
            if (run.code !== 0 || !line) {
              skip(`recipe ${name}'s example failed (exit ${run.code})`);
              continue;
            }
            const numbers = JSON.parse(line) as Record<string, unknown>;
            for (const f of fields) {
              if (typeof numbers[f] === "number") result[f] = numbers[f];
              else absent[f] = `recipe ${name}'s example did not report it`;
            }
            result[`${name}_load_1m`] = numbers.load_1m;
          } catch (err) {
            skip(`recipe ${name}: ${(err as Error).message.split("\n")[0]}`);
          }
        }
      } finally {
        s.stop();
        await daemon?.stop();
      }
      result.load_1m_end = Math.round(os.loadavg()[0]! * 100) / 100;
      result.absent = absent;
      emit("recipes", result, opts);
    });
}
