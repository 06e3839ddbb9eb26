// Recipes: a directory (recipes/NAME/) holding recipe.json, the files it copies
// into the guest and an example program. Everything a recipe names is checked
// here, before anything runs: unknown keys, paths out of its directory and
// symlinks are refused, so a build never reads a host file the recipe does not own.
import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { ForkdError } from "../common/errors.js";
import { sha256File } from "../common/fsutil.js";
import { NAME_RE } from "../common/validate.js";

/** The file each recipe directory holds. */
const RECIPE_FILE = "recipe.json";

/** Debian package names as dpkg allows them. */
const DEBIAN_PACKAGE = z.string().regex(/^[a-z0-9][a-z0-9+.-]+$/, "not a Debian package name");

/** A path inside the recipe's directory, relative and without `..` (symlinks are checked on disk). */
const RECIPE_RELATIVE = z
  .string()
  .min(1)
  .max(256)
  .refine((p) => !path.isAbsolute(p) && !p.split("/").includes("..") && !p.includes("\0"), "must be a path inside the recipe directory");

/** Where a copied file lands in the guest: absolute, normalised, and not under forkd's own /opt/forkd. */
const GUEST_PATH = z
  .string()
  .max(256)
  .refine((p) => p.startsWith("/") && path.posix.normalize(p) === p && p !== "/" && !p.endsWith("/"), "must be a normalised absolute path")
  .refine((p) => p !== "/opt/forkd" && !p.startsWith("/opt/forkd/"), "/opt/forkd is forkd's own");

const RecipeFileSchema = z
  .object({
    description: z.string().min(1).max(300),
    image: z
      .object({
        /** busybox: forkd's minimal root; debian: debootstrapped bookworm (minbase) with `packages`. */
        base: z.enum(["busybox", "debian"]),
        packages: z.array(DEBIAN_PACKAGE).max(64).default([]),
        files: z
          .array(
            z
              .object({
                from: RECIPE_RELATIVE,
                to: GUEST_PATH,
                mode: z
                  .string()
                  .regex(/^0?[0-7]{3}$/, "an octal mode like 0644")
                  .optional(),
              })
              .strict(),
          )
          .max(64)
          .default([]),
      })
      .strict(),
    warm: z
      .object({
        /** Shell commands run in the parent, in order, before the snapshot; each must exit 0. */
        commands: z.array(z.string().min(1).max(4096)).max(32).default([]),
        /** JavaScript evaluated in the agent's warm context after the commands (state children inherit). */
        evals: z.array(z.string().min(1).max(16384)).max(32).default([]),
      })
      .strict()
      .default({ commands: [], evals: [] }),
    snapshot: z
      .object({
        memoryMib: z.number().int().min(128).max(4096).default(256),
        vcpus: z.number().int().min(1).max(8).default(1),
      })
      .strict()
      .default({ memoryMib: 256, vcpus: 1 }),
    /** The example program (TypeScript on @forkd/sdk), compiled to recipes/dist/NAME/. */
    example: RECIPE_RELATIVE.refine((p) => p.endsWith(".ts"), "must be a .ts file"),
  })
  .strict();

export type RecipeSpec = z.infer<typeof RecipeFileSchema>;

/** One file the image build copies into the guest. */
export type RecipeFileCopy = { source: string; target: string; mode: number };

export type Recipe = {
  name: string;
  dir: string;
  spec: RecipeSpec;
  /** Every regular file the image takes, directories expanded, in a stable order. */
  copies: RecipeFileCopy[];
  /** The example program's source. */
  example: string;
};

/** Parse and check a recipe file's text; `where` names it in messages. */
export function parseRecipeSpec(text: string, where: string): RecipeSpec {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ForkdError("bad_request", `${where} is not JSON: ${(err as Error).message}`);
  }
  const parsed = RecipeFileSchema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => {
      const at = i.path.length ? i.path.join(".") : "(top level)";
      const keys = "keys" in i && Array.isArray(i.keys) ? ` ${i.keys.join(", ")}` : "";
      return `${at}: ${i.message}${keys}`;
    });
    throw new ForkdError("bad_request", `${where} is not a valid recipe: ${issues.join("; ")}`, { issues });
  }
  const spec = parsed.data;
  if (spec.image.base === "busybox" && spec.image.packages.length > 0) {
    throw new ForkdError("bad_request", `${where}: image.packages needs image.base "debian" (a busybox root has no package manager)`);
  }
  const targets = new Set<string>();
  for (const f of spec.image.files) {
    if (targets.has(f.to)) throw new ForkdError("bad_request", `${where}: two files go to ${f.to}`);
    targets.add(f.to);
  }
  return spec;
}

/**
 * A path of the recipe resolved on disk: every component from the recipe
 * directory down is lstat'ed, so a symlink anywhere on the way (to the host, or
 * even back into the recipe) is refused rather than followed.
 */
async function realInside(dir: string, rel: string, where: string): Promise<{ full: string; isDir: boolean }> {
  const parts = rel.split("/").filter((p) => p && p !== ".");
  let current = dir;
  let st: import("node:fs").Stats | undefined;
  for (const part of parts) {
    current = path.join(current, part);
    st = await fs.lstat(current).catch(() => undefined);
    if (!st) throw new ForkdError("bad_request", `${where}: ${rel} does not exist in the recipe directory`);
    if (st.isSymbolicLink())
      throw new ForkdError("bad_request", `${where}: ${path.relative(dir, current)} is a symlink; recipes take real files only`);
  }
  if (!st) throw new ForkdError("bad_request", `${where}: ${rel} names the recipe directory itself`);
  if (!st.isFile() && !st.isDirectory()) throw new ForkdError("bad_request", `${where}: ${rel} is neither a file nor a directory`);
  return { full: current, isDir: st.isDirectory() };
}

/** The regular files under a directory, refusing symlinks and special files anywhere in it. */
async function filesUnder(root: string, where: string, recipeDir: string): Promise<string[]> {
  const out: string[] = [];
  const entries = await fs.readdir(root, { withFileTypes: true });
  for (const entry of entries.sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const full = path.join(root, entry.name);
    if (entry.isSymbolicLink())
      throw new ForkdError("bad_request", `${where}: ${path.relative(recipeDir, full)} is a symlink; recipes take real files only`);
    if (entry.isDirectory()) out.push(...(await filesUnder(full, where, recipeDir)));
    else if (entry.isFile()) out.push(full);
    else throw new ForkdError("bad_request", `${where}: ${path.relative(recipeDir, full)} is neither a file nor a directory`);
  }
  return out;
}

/** Load recipes/NAME: the name, the file and everything it names are checked before anything runs. */
export async function loadRecipe(recipesDir: string, name: string): Promise<Recipe> {
  if (!NAME_RE.test(name) || name.includes("..")) {
    throw new ForkdError("bad_request", `'${name}' is not a recipe name (letters, digits, '_', '.', '-')`);
  }
  const root = path.resolve(recipesDir);
  const dirStat = await fs.lstat(path.join(root, name)).catch(() => undefined);
  if (!dirStat?.isDirectory()) {
    const known = (await listRecipeNames(root)).join(", ") || "none";
    throw new ForkdError("not_found", `no recipe '${name}' in ${root}; recipes: ${known}`, { recipes: known });
  }
  const dir = path.join(root, name);
  const where = `${name}/${RECIPE_FILE}`;
  const file = await realInside(dir, RECIPE_FILE, where);
  if (file.isDir) throw new ForkdError("bad_request", `${where} is a directory`);
  const spec = parseRecipeSpec(await fs.readFile(file.full, "utf8"), where);
  const copies: RecipeFileCopy[] = [];
  for (const f of spec.image.files) {
    const found = await realInside(dir, f.from, where);
    const mode = f.mode ? Number.parseInt(f.mode, 8) : undefined;
    if (!found.isDir) {
      copies.push({ source: found.full, target: f.to, mode: mode ?? 0o644 });
      continue;
    }
    for (const source of await filesUnder(found.full, where, dir)) {
      copies.push({
        source,
        target: path.posix.join(f.to, path.relative(found.full, source).split(path.sep).join("/")),
        mode: mode ?? 0o644,
      });
    }
  }
  const example = await realInside(dir, spec.example, where);
  if (example.isDir) throw new ForkdError("bad_request", `${where}: example ${spec.example} is a directory`);
  return { name, dir, spec, copies, example: example.full };
}

/** Directory names under `recipesDir` that hold a recipe file. */
export async function listRecipeNames(recipesDir: string): Promise<string[]> {
  const entries = await fs.readdir(recipesDir, { withFileTypes: true }).catch(() => []);
  const names: string[] = [];
  for (const e of entries) {
    if (!e.isDirectory() || !NAME_RE.test(e.name)) continue;
    const st = await fs.lstat(path.join(recipesDir, e.name, RECIPE_FILE)).catch(() => undefined);
    if (st?.isFile()) names.push(e.name);
  }
  return names.sort();
}

/**
 * The snapshot half of a recipe's identity: the image build's digest (which
 * covers its packages and copied files) plus what the warm-up runs and the
 * snapshot's shape. Equal digests mean an equal warm snapshot.
 */
export function recipeDigest(recipe: Recipe, imageDigest: string): string {
  return createHash("sha256")
    .update(`recipe ${recipe.name}\nimage ${imageDigest}\n`)
    .update(JSON.stringify({ warm: recipe.spec.warm, snapshot: recipe.spec.snapshot }))
    .digest("hex");
}

/** Hash of the copied files (paths, modes, bytes), for the image digest. */
export async function copiesDigest(copies: readonly RecipeFileCopy[]): Promise<string> {
  const hash = createHash("sha256");
  for (const c of copies) hash.update(`${c.target}\0${c.mode}\0${await sha256File(c.source)}\n`);
  return hash.digest("hex");
}
