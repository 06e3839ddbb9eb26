// Recipe files are checked before anything runs: unknown keys, paths out of the
// recipe's directory and symlinks are refused with the reason.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError, listRecipeNames, loadRecipe, parseRecipeSpec, recipeDigest } from "@forkd/core";
import { afterAll, describe, expect, it } from "vitest";
import { REPO_ROOT } from "../helpers/env.js";

const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-recipes-unit-"));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

const GOOD = {
  description: "a test recipe",
  image: { base: "debian", packages: ["postgresql"], files: [{ from: "files", to: "/opt/recipe/files" }] },
  warm: { commands: ["true"] },
  example: "example.ts",
};

function recipeDir(name: string, spec: unknown, extra: (dir: string) => void = () => {}): string {
  const dir = path.join(root, name);
  fs.mkdirSync(path.join(dir, "files"), { recursive: true });
  fs.writeFileSync(path.join(dir, "files", "a.sql"), "SELECT 1;\n");
  fs.writeFileSync(path.join(dir, "example.ts"), "export {};\n");
  fs.writeFileSync(path.join(dir, "recipe.json"), JSON.stringify(spec));
  extra(dir);
  return dir;
}

async function refusal(name: string): Promise<string> {
  const err = await loadRecipe(root, name).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ForkdError);
  expect((err as ForkdError).code).toBe("bad_request");
  return (err as Error).message;
}

describe("recipe files", () => {
  it("loads a good recipe with defaults and its directory's files expanded", async () => {
    recipeDir("good", GOOD);
    const recipe = await loadRecipe(root, "good");
    expect(recipe.spec.snapshot).toEqual({ memoryMib: 256, vcpus: 1 });
    expect(recipe.spec.warm.evals).toEqual([]);
    expect(recipe.copies).toEqual([{ source: path.join(root, "good", "files", "a.sql"), target: "/opt/recipe/files/a.sql", mode: 0o644 }]);
    expect(recipeDigest(recipe, "a".repeat(64))).not.toBe(recipeDigest(recipe, "b".repeat(64)));
  });

  it("refuses unknown keys, at the top and nested", async () => {
    recipeDir("unknown-top", { ...GOOD, postInstall: "curl x | sh" });
    expect(await refusal("unknown-top")).toMatch(/postInstall/);
    recipeDir("unknown-nested", { ...GOOD, image: { ...GOOD.image, script: "x" } });
    expect(await refusal("unknown-nested")).toMatch(/image.*script/);
    expect(() => parseRecipeSpec(JSON.stringify({ ...GOOD, snapshot: { memoryMib: 256, cpus: 2 } }), "x")).toThrow(/cpus/);
  });

  it("refuses paths outside the directory and guest paths in forkd's own tree", async () => {
    recipeDir("dotdot", { ...GOOD, image: { ...GOOD.image, files: [{ from: "../good/files", to: "/opt/x" }] } });
    expect(await refusal("dotdot")).toMatch(/inside the recipe directory/);
    recipeDir("absolute", { ...GOOD, image: { ...GOOD.image, files: [{ from: "/etc/shadow", to: "/opt/x" }] } });
    expect(await refusal("absolute")).toMatch(/inside the recipe directory/);
    recipeDir("opt-forkd", { ...GOOD, image: { ...GOOD.image, files: [{ from: "files", to: "/opt/forkd/agent.js" }] } });
    expect(await refusal("opt-forkd")).toMatch(/forkd's own/);
    recipeDir("relative-to", { ...GOOD, image: { ...GOOD.image, files: [{ from: "files", to: "opt/../etc" }] } });
    expect(await refusal("relative-to")).toMatch(/absolute path/);
  });

  it("refuses a symlink named by the recipe, one inside a copied directory, and a symlinked recipe file", async () => {
    recipeDir("link-named", { ...GOOD, image: { ...GOOD.image, files: [{ from: "passwd", to: "/opt/x" }] } }, (dir) =>
      fs.symlinkSync("/etc/passwd", path.join(dir, "passwd")),
    );
    expect(await refusal("link-named")).toMatch(/passwd is a symlink/);
    recipeDir("link-inside", GOOD, (dir) => fs.symlinkSync("/etc", path.join(dir, "files", "etc")));
    expect(await refusal("link-inside")).toMatch(/files\/etc is a symlink/);
    recipeDir("link-back-in", GOOD, (dir) => fs.symlinkSync("a.sql", path.join(dir, "files", "b.sql")));
    expect(await refusal("link-back-in")).toMatch(/b\.sql is a symlink/);
    const dir = recipeDir("link-recipe", GOOD);
    fs.renameSync(path.join(dir, "recipe.json"), path.join(dir, "real.json"));
    fs.symlinkSync("real.json", path.join(dir, "recipe.json"));
    await expect(loadRecipe(root, "link-recipe")).rejects.toThrow(/recipe.json is a symlink/);
  });

  it("refuses packages on busybox, bad package names, a missing example and a bad name", async () => {
    recipeDir("busybox-packages", { ...GOOD, image: { base: "busybox", packages: ["git"] } });
    expect(await refusal("busybox-packages")).toMatch(/needs image.base "debian"/);
    recipeDir("bad-package", { ...GOOD, image: { base: "debian", packages: ["git; rm -rf /"] } });
    expect(await refusal("bad-package")).toMatch(/Debian package name/);
    recipeDir("no-example", { ...GOOD, example: "missing.ts" });
    expect(await refusal("no-example")).toMatch(/missing.ts does not exist/);
    await expect(loadRecipe(root, "../good")).rejects.toThrow(/not a recipe name/);
    await expect(loadRecipe(root, "absent")).rejects.toMatchObject({ code: "not_found" });
  });

  it("accepts every recipe in the repository", async () => {
    const dir = path.join(REPO_ROOT, "recipes");
    const names = await listRecipeNames(dir);
    expect(names).toContain("postgres-fixture");
    for (const name of names) await loadRecipe(dir, name);
  });
});
