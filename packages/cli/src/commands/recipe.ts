import { listRecipeNames, loadRecipe } from "@forkd/core";
import type { Command } from "commander";
import { openBackend } from "../backend.js";
import { buildRecipe, compiledExample, daemonForExamples, defaultRecipesDir, recipeStatus, runExample } from "../recipes.js";
import { fmtMs, plainTable, withSpinner } from "../ui.js";

type DirOpt = { dir?: string };

export function registerRecipe(program: Command): void {
  const recipe = program.command("recipe").description("real workloads as recipes: an image, a warm snapshot and an example program");
  recipe
    .command("ls")
    .description("list the recipes and whether each is built from its current inputs")
    .option("--dir <dir>", "the recipes directory (default: the repository's recipes/)")
    .option("--json", "machine-readable output")
    .action(async (opts: DirOpt & { json?: boolean }) => {
      const dir = opts.dir ?? defaultRecipesDir();
      const backend = await openBackend();
      const rows: { name: string; description: string; base: string; packages: string[]; status: string }[] = [];
      for (const name of await listRecipeNames(dir)) {
        try {
          const r = await loadRecipe(dir, name);
          const status = await recipeStatus(r, backend);
          rows.push({
            name,
            description: r.spec.description,
            base: r.spec.image.base,
            packages: r.spec.image.packages,
            status: status.built ? "built" : `not built (${status.reason})`,
          });
        } catch (err) {
          rows.push({ name, description: "", base: "-", packages: [], status: `invalid: ${(err as Error).message}` });
        }
      }
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
        return;
      }
      const table = plainTable(["NAME", "BASE", "PACKAGES", "STATUS", "DESCRIPTION"]);
      for (const r of rows) table.push([r.name, r.base, r.packages.join(",") || "-", r.status, r.description]);
      process.stdout.write(rows.length ? `${table.toString()}\n` : `no recipes in ${dir}\n`);
    });
  recipe
    .command("build")
    .description("build a recipe's image and warm snapshot (tagged NAME); cached by a digest of every input")
    .argument("<name>")
    .option("--dir <dir>", "the recipes directory (default: the repository's recipes/)")
    .option("--force", "make the snapshot again even if it is current")
    .action(async (name: string, opts: DirOpt & { force?: boolean }) => {
      const dir = opts.dir ?? defaultRecipesDir();
      const backend = await openBackend();
      const result = await withSpinner(
        `recipe ${name}`,
        (s) => buildRecipe(dir, name, backend, { force: opts.force, onProgress: (step) => (s.text = `recipe ${name}: ${step}`) }),
        (r) => `recipe ${name} ${r.cached ? "is up to date" : "built"} (${r.digest.slice(0, 12)}) in ${fmtMs(r.buildMs)}`,
      );
      if (!process.stderr.isTTY)
        process.stdout.write(`recipe ${name} ${result.cached ? "cached" : "built"} ${result.digest.slice(0, 12)}\n`);
    });
  recipe
    .command("run")
    .description("build the recipe if needed, then run its example program and print its table (--json: its numbers)")
    .argument("<name>")
    .option("--dir <dir>", "the recipes directory (default: the repository's recipes/)")
    .option("--json", "the example prints one JSON object instead of a table")
    .action(async (name: string, opts: DirOpt & { json?: boolean }) => {
      const dir = opts.dir ?? defaultRecipesDir();
      const backend = await openBackend();
      const built = await withSpinner(
        `recipe ${name}`,
        (s) => buildRecipe(dir, name, backend, { onProgress: (step) => (s.text = `recipe ${name}: ${step}`) }),
        (r) => `recipe ${name} ${r.cached ? "is up to date" : "built"} (${r.digest.slice(0, 12)})`,
      );
      const example = compiledExample(dir, built.recipe);
      const daemon = await daemonForExamples(backend);
      try {
        const { code } = await runExample(example, opts.json ? ["--json"] : [], daemon.env);
        if (code !== 0) process.exitCode = code ?? 1;
      } finally {
        await daemon.stop();
      }
    });
}
