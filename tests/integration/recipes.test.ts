// Recipes end to end on a small scale: a busybox recipe is built (image + warm
// snapshot), cached by its digest, and its example run against the daemon
// `recipe run` starts; a recipe whose warm-up fails names the step, shows its
// output and leaves nothing registered. The repository's own recipes (Debian
// images, minutes each under TCG) run in scripts/recipes-check.sh instead.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { listImages, listSnapshots } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, isolateForkd, REPO_ROOT } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const recipes = fs.mkdtempSync(path.join(env.runDir, "recipes-"));

function forkd(args: string[], timeoutMs = 600_000) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: timeoutMs, env: process.env });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

/** A recipe directory, and its example as `npm run build` would leave it (compiled JS in dist/NAME). */
function writeRecipe(name: string, spec: unknown, exampleJs: string): void {
  const dir = path.join(recipes, name);
  fs.mkdirSync(path.join(dir, "data"), { recursive: true });
  fs.writeFileSync(path.join(dir, "data", "greeting.txt"), `hello from ${name}\n`);
  fs.writeFileSync(path.join(dir, "recipe.json"), JSON.stringify(spec, null, 2));
  fs.writeFileSync(path.join(dir, "example.ts"), "// compiled form in dist/\n");
  fs.mkdirSync(path.join(recipes, "dist", name), { recursive: true });
  fs.writeFileSync(path.join(recipes, "dist", name, "example.js"), exampleJs);
}

const SDK = pathToFileURL(path.join(REPO_ROOT, "packages/sdk/dist/index.js")).href;

beforeAll(() => {
  writeRecipe(
    "tiny",
    {
      description: "a busybox recipe for the test",
      image: { base: "busybox", files: [{ from: "data", to: "/opt/recipe/data" }] },
      warm: { commands: ["cat /opt/recipe/data/greeting.txt > /tmp/warmed"], evals: ["globalThis.answer = 40 + 2"] },
      snapshot: { memoryMib: 128 },
      example: "example.ts",
    },
    `const { Sandbox } = await import(${JSON.stringify(SDK)});
const sb = await Sandbox.create({ template: "tiny" });
try {
  const warmed = (await sb.commands.run("cat /tmp/warmed")).stdout.trim();
  const answer = (await sb.runCode("answer")).value;
  process.stdout.write(JSON.stringify({ warmed, answer, json: process.argv.includes("--json") }) + "\\n");
} finally {
  await sb.kill();
}
`,
  );
  writeRecipe(
    "broken",
    {
      description: "a recipe whose warm-up fails",
      image: { base: "busybox", files: [{ from: "data", to: "/opt/recipe/data" }] },
      warm: { commands: ["echo about to fail; cat /opt/recipe/data/absent.txt"] },
      snapshot: { memoryMib: 128 },
      example: "example.ts",
    },
    "process.exit(3);\n",
  );
});

afterAll(() => {
  forkd(["rmi", "--force", "tiny"], 120_000);
  fs.rmSync(path.join(process.env.FORKD_HOME!, "images", "recipe-tiny"), { recursive: true, force: true });
  fs.rmSync(recipes, { recursive: true, force: true });
});

describe("forkd recipe", () => {
  it("builds a recipe into an image and a warm snapshot, then finds it up to date", async () => {
    const built = forkd(["recipe", "build", "tiny", "--dir", recipes]);
    expect(built.stderr + built.stdout).toMatch(/recipe tiny built [0-9a-f]{12}/);
    expect(built.code).toBe(0);
    expect((await listSnapshots()).map((s) => s.tag)).toContain("tiny");
    expect((await listImages()).map((i) => i.name)).toContain("recipe-tiny");
    const again = forkd(["recipe", "build", "tiny", "--dir", recipes]);
    expect(again.stdout).toMatch(/recipe tiny cached/);
    const ls = JSON.parse(forkd(["recipe", "ls", "--dir", recipes, "--json"]).stdout) as { name: string; status: string }[];
    expect(ls.find((r) => r.name === "tiny")?.status).toBe("built");
    expect(ls.find((r) => r.name === "broken")?.status).toMatch(/not built/);
  });

  it("runs the example against a daemon it starts, in a fork holding the warm state", () => {
    const run = forkd(["recipe", "run", "tiny", "--dir", recipes, "--json"]);
    expect(run.code, run.stderr).toBe(0);
    const line = run.stdout.split("\n").find((l) => l.startsWith("{"));
    expect(JSON.parse(line ?? "{}")).toEqual({ warmed: "hello from tiny", answer: 42, json: true });
  });

  it("a failed warm-up names the step, shows its output and leaves nothing registered", async () => {
    const res = forkd(["recipe", "build", "broken", "--dir", recipes]);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toMatch(/recipe broken: step 'warm snapshot' failed/);
    expect(res.stderr).toMatch(/about to fail/);
    expect(res.stderr).toMatch(/absent\.txt/);
    expect((await listSnapshots()).map((s) => s.tag)).not.toContain("broken");
    expect((await listImages()).map((i) => i.name)).not.toContain("recipe-broken");
    expect(fs.existsSync(path.join(process.env.FORKD_HOME!, "images", "recipe-broken"))).toBe(false);
    expect(fs.existsSync(path.join(process.env.FORKD_HOME!, "recipes", "broken.json"))).toBe(false);
  });

  it("refuses a recipe with an unknown key before anything runs", () => {
    writeRecipe("unknown-key", { description: "x", image: { base: "busybox" }, example: "example.ts", run: "rm -rf /" }, "");
    const res = forkd(["recipe", "build", "unknown-key", "--dir", recipes], 60_000);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toMatch(/Unrecognized key.*run/i);
    expect(fs.existsSync(path.join(process.env.FORKD_HOME!, "images", "recipe-unknown-key"))).toBe(false);
  });
});
