import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Alias, Plugin } from "vite";
import { defineConfig } from "vitest/config";

const REPO_ROOT = path.dirname(fileURLToPath(import.meta.url));

/**
 * Tests import the sources, not the build: every `@forkd/NAME[/SUB]` a package's
 * `exports` maps to `./dist/X.js` resolves to `packages/NAME/src/X.ts` when that file
 * exists, so one test run never loads a package from dist and from src (two copies of
 * a module: two ForkdError classes, and `instanceof` fails across them). Read from each
 * package.json, so a new subpath export is covered without touching this file. Entries
 * with no source (the agent's esbuild bundle, the C and Python files) keep their file.
 * Tests that run the CLI or the daemon as processes still run the built dist: the product.
 */
function sourceAliases(): Alias[] {
  const aliases: Alias[] = [];
  const packagesDir = path.join(REPO_ROOT, "packages");
  for (const dir of fs.readdirSync(packagesDir)) {
    const manifest = path.join(packagesDir, dir, "package.json");
    if (!fs.existsSync(manifest)) continue;
    const pkg = JSON.parse(fs.readFileSync(manifest, "utf8")) as { name: string; exports?: Record<string, unknown> };
    for (const [subpath, target] of Object.entries(pkg.exports ?? {})) {
      const file = typeof target === "string" ? target : (target as { default?: string }).default;
      const built = /^\.\/dist\/(.+)\.js$/.exec(file ?? "");
      if (!built) continue;
      const source = path.join(packagesDir, dir, "src", `${built[1]}.ts`);
      if (!fs.existsSync(source)) continue;
      const specifier = pkg.name + subpath.slice(1); // "." -> "@forkd/core", "./errors" -> "@forkd/core/errors"
      aliases.push({ find: new RegExp(`^${specifier.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}$`), replacement: source });
    }
  }
  return aliases;
}

/**
 * The rule above, enforced: a test (or a module it loads) that reaches a package's dist
 * by a path (`../../packages/core/dist/...`, or an export with no source) fails to load
 * instead of silently running a second copy beside the sources.
 */
const sourcesOnly: Plugin = {
  name: "forkd-tests-load-sources-only",
  enforce: "pre",
  load(id) {
    const file = id.split("?")[0] ?? id;
    if (file.startsWith(path.join(REPO_ROOT, "packages")) && /\/packages\/[^/]+\/dist\/.*\.js$/.test(file)) {
      throw new Error(`${path.relative(REPO_ROOT, file)}: tests load @forkd/* from src; this dist module would be a second copy`);
    }
    return null;
  },
};

/** Integration and hostile tests boot real VMs: one temp root for the run, watched for unconfined QEMUs. */
const VM_GLOBAL_SETUP = ["tests/helpers/global-setup.ts"];

export default defineConfig({
  plugins: [sourcesOnly],
  resolve: { alias: sourceAliases() },
  test: {
    reporters: ["default"],
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          include: ["tests/unit/**/*.test.ts"],
          // Pure logic, no VMs, no set-up: files run side by side and the project finishes first.
          fileParallelism: true,
          // Modules are evaluated once per worker, not once per file (a fresh @forkd/core per file
          // was two thirds of the project's CPU); process.env is put back after each file.
          isolate: false,
          setupFiles: ["tests/helpers/unit-setup.ts"],
          // vitest's default on 2 cores is one worker; these files mostly wait (processes, timeouts, sockets).
          maxWorkers: "100%",
          testTimeout: 60_000,
          sequence: { groupOrder: 0 },
        },
      },
      {
        extends: true,
        test: {
          name: "integration",
          // tests/e2b: the unmodified e2b npm SDK against a real daemon (one at a time too).
          include: ["tests/integration/**/*.test.ts", "tests/e2b/**/*.test.ts"],
          globalSetup: VM_GLOBAL_SETUP,
          // Real VMs on a 2-core machine: one file at a time.
          fileParallelism: false,
          testTimeout: 120_000,
          hookTimeout: 180_000,
          sequence: { groupOrder: 1 },
        },
      },
      {
        extends: true,
        test: {
          name: "hostile",
          include: ["tests/hostile/**/*.test.ts"],
          globalSetup: VM_GLOBAL_SETUP,
          fileParallelism: false,
          testTimeout: 120_000,
          hookTimeout: 180_000,
          sequence: { groupOrder: 2 },
        },
      },
      {
        extends: true,
        test: {
          name: "cluster",
          // A real etcd and several daemons as processes (tests/cluster/helpers.ts), with VMs on some.
          include: ["tests/cluster/**/*.test.ts"],
          globalSetup: VM_GLOBAL_SETUP,
          fileParallelism: false,
          testTimeout: 180_000,
          hookTimeout: 600_000,
          sequence: { groupOrder: 3 },
        },
      },
      {
        extends: true,
        test: {
          name: "browser",
          // The dashboard in headless chromium against a real daemon with real VMs.
          include: ["tests/browser/**/*.test.ts"],
          globalSetup: VM_GLOBAL_SETUP,
          fileParallelism: false,
          testTimeout: 120_000,
          hookTimeout: 900_000,
          sequence: { groupOrder: 4 },
        },
      },
    ],
  },
});
