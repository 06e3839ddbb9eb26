// Building and running recipes (recipes/NAME/recipe.json): an image from the
// recipe's Debian packages and files, a warm snapshot tagged NAME, and the
// example program run against a daemon. Shared by `forkd recipe` and
// `forkd bench recipes`.
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  buildImage,
  ForkdError,
  forgetImageBuild,
  forkdHome,
  getImage,
  type ImageManifest,
  loadRecipe,
  type Recipe,
  recipeDigest,
  settingsEnv,
} from "@forkd/core";
import { accepts } from "./backend.js";
import type { Backend } from "./backend-types.js";

/** The repository's recipes/ (this file is packages/cli/dist/recipes.js once built). */
export function defaultRecipesDir(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../recipes");
}

/** The image a recipe builds; its own namespace, so a recipe cannot replace `base` or `python`. */
function recipeImageName(name: string): string {
  return `recipe-${name}`;
}

/** What a built recipe left: which image build and snapshot, from which inputs. */
type RecipeStamp = { schema: 1; name: string; digest: string; imageDigest: string; snapshotCreatedAt: string | null };

function stampFile(name: string): string {
  return path.join(forkdHome(), "recipes", `${name}.json`);
}

function readStamp(name: string): RecipeStamp | undefined {
  try {
    return JSON.parse(fs.readFileSync(stampFile(name), "utf8")) as RecipeStamp;
  } catch {
    return undefined;
  }
}

export type RecipeBuildResult = { recipe: Recipe; cached: boolean; digest: string; image: ImageManifest; buildMs: number };

async function currentImageDigest(name: string): Promise<string | undefined> {
  try {
    return (await getImage(name)).digest;
  } catch {
    return undefined;
  }
}

/**
 * Whether the recipe's snapshot is built from exactly these inputs: the stamp's
 * digest matches, and the snapshot tagged NAME is still the one the stamp saw.
 */
export async function recipeStatus(recipe: Recipe, backend: Backend): Promise<{ built: boolean; digest?: string; reason: string }> {
  const stamp = readStamp(recipe.name);
  if (!stamp) return { built: false, reason: "never built" };
  const imageDigest = await currentImageDigest(recipeImageName(recipe.name));
  if (!imageDigest || imageDigest !== stamp.imageDigest) return { built: false, reason: "its image changed" };
  if (recipeDigest(recipe, imageDigest) !== stamp.digest) return { built: false, reason: "the recipe changed" };
  const snap = (await backend.listSnapshots()).find((s) => s.tag === recipe.name);
  if (!snap || snap.image_digest !== stamp.imageDigest || (snap.created_at ?? null) !== stamp.snapshotCreatedAt) {
    return { built: false, reason: `snapshot ${recipe.name} is missing or not the recipe's` };
  }
  return { built: true, digest: stamp.digest, reason: "up to date" };
}

/**
 * Build a recipe: image (cached by the digest of its packages, files and forkd's
 * own inputs), then the warm snapshot tagged NAME (cached by the recipe digest).
 * A failed step is named with its output, and leaves nothing registered: an
 * image this call built is forgotten again, and no snapshot or stamp is written.
 */
export async function buildRecipe(
  recipesDir: string,
  name: string,
  backend: Backend,
  opts: { force?: boolean; onProgress?: (step: string) => void } = {},
): Promise<RecipeBuildResult> {
  const started = performance.now();
  const progress = opts.onProgress ?? (() => {});
  const recipe = await loadRecipe(recipesDir, name);
  const imageName = recipeImageName(name);
  const previousImage = await currentImageDigest(imageName);
  let image: { manifest: ImageManifest; cached: boolean };
  try {
    image = await buildImage({
      name: imageName,
      base: recipe.spec.image.base,
      ...(recipe.spec.image.packages.length ? { packages: recipe.spec.image.packages } : {}),
      files: recipe.copies,
      onProgress: (step) => progress(`image: ${step}`),
    });
  } catch (err) {
    throw stepFailed(name, "image", err);
  }
  const digest = recipeDigest(recipe, image.manifest.digest);
  const status = await recipeStatus(recipe, backend);
  if (status.built && !opts.force) {
    return { recipe, cached: true, digest, image: image.manifest, buildMs: performance.now() - started };
  }
  const undoImage = async () => {
    if (!image.cached) await forgetImageBuild(imageName, image.manifest.digest, previousImage);
  };
  try {
    fs.rmSync(stampFile(name), { force: true });
    if ((await backend.listSnapshots()).some((s) => s.tag === name)) {
      progress(`removing the old snapshot ${name}`);
      await backend.removeSnapshot(name, {});
    }
    const snapshot = await backend.createSnapshot({
      tag: name,
      image: imageName,
      warm: recipe.spec.warm.commands,
      warmEval: recipe.spec.warm.evals,
      memoryMib: recipe.spec.snapshot.memoryMib,
      vcpus: recipe.spec.snapshot.vcpus,
      onProgress: (step) => progress(`snapshot: ${step}`),
    });
    const stamp: RecipeStamp = {
      schema: 1,
      name,
      digest,
      imageDigest: image.manifest.digest,
      snapshotCreatedAt: snapshot.created_at ?? null,
    };
    fs.mkdirSync(path.dirname(stampFile(name)), { recursive: true, mode: 0o755 });
    fs.writeFileSync(`${stampFile(name)}.tmp`, `${JSON.stringify(stamp, null, 2)}\n`);
    fs.renameSync(`${stampFile(name)}.tmp`, stampFile(name));
  } catch (err) {
    await undoImage();
    throw stepFailed(name, "warm snapshot", err);
  }
  return { recipe, cached: false, digest, image: image.manifest, buildMs: performance.now() - started };
}

function stepFailed(name: string, step: string, err: unknown): ForkdError {
  const code = err instanceof ForkdError ? err.code : "io_error";
  const message = err instanceof Error ? err.message : String(err);
  return new ForkdError(code, `recipe ${name}: step '${step}' failed: ${message}`, { step }, { cause: err });
}

/** The compiled example (recipes/dist/NAME/…js, from `npm run build`). */
export function compiledExample(recipesDir: string, recipe: Recipe): string {
  const file = path.join(recipesDir, "dist", recipe.name, recipe.spec.example.replace(/\.ts$/, ".js"));
  if (!fs.existsSync(file)) {
    throw new ForkdError("missing_dependency", `recipe ${recipe.name}'s example is not compiled (${file}); run \`npm run build\``);
  }
  return file;
}

/** A daemon for the example to talk to: the user's if one answers, else one of ours for the run. */
export async function daemonForExamples(backend: Backend): Promise<{ env: NodeJS.ProcessEnv; stop: () => Promise<void> }> {
  if (backend.kind === "daemon") return { env: settingsEnv(), stop: async () => {} };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-recipe-daemon-"));
  const socket = path.join(dir, "forkd.sock");
  const child: ChildProcess = spawn(
    process.execPath,
    [process.argv[1]!, "daemon", "--socket", socket, "--listen", "none", "--audit-log", path.join(dir, "audit.log")],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (log += d));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 60_000;
  while (!(await accepts(socket))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new ForkdError("io_error", `could not start a daemon for the example: ${log.trim().slice(-1000)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  // Over its unix socket the daemon needs no token (the socket is root's, 0600).
  return { env: settingsEnv({ url: `unix:${socket}`, token: undefined }), stop };
}

/** Run the compiled example; its stdout is passed through (`capture` also keeps it). */
export function runExample(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  opts: { capture?: boolean } = {},
): Promise<{ code: number | null; stdout: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [file, ...args], { env, stdio: ["ignore", opts.capture ? "pipe" : "inherit", "inherit"] });
    let stdout = "";
    child.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.once("error", reject);
    child.once("exit", (code) => resolve({ code, stdout }));
  });
}
