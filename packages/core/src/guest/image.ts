// Guest images: a kernel, an initramfs and a read-only ext4 root, cached by a
// digest of every input so a rebuild happens only when one of them changes.
import { createHash } from "node:crypto";
import fsSync from "node:fs";
import fs from "node:fs/promises";
import { createRequire } from "node:module";
import path from "node:path";
import { imagesDir } from "../common/config.js";
import { ensureStateDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { exists, fsyncDir, readJson, sha256File, writeFileAtomic } from "../common/fsutil.js";
import { runChecked, runProgram } from "../common/program.js";
import { setting } from "../common/settings.js";
import { validateName } from "../common/validate.js";
import { busyboxShims, patchBusybox, WGET_APPLET } from "./busybox.js";
import { type CpioEntry, writeCpio } from "./cpio.js";
import { GUEST_MODULES, initramfsInit, NSSWITCH_CONF, nodeWrapper, stage2Init } from "./guest-init.js";
import { copiesDigest, type RecipeFileCopy } from "./recipe-file.js";

/** Bump when the layout of what we build changes, so old caches are not reused. */
const RECIPE_VERSION = 1;

export type ImageManifest = {
  schema: 1;
  name: string;
  digest: string;
  createdAt: string;
  kernelVersion: string;
  kernel: string;
  initrd: string;
  rootfs: string;
  rootfsBytes: number;
  runtimes: string[];
};

type ImageProgress = (step: string) => void;

export type KernelInfo = { version: string; vmlinuz: string; modulesDir: string };

/** Compare Debian kernel versions like 6.1.0-56 numerically, part by part. */
export function compareKernelVersions(a: string, b: string): number {
  const pa = a.split(/[.-]/).map((x) => (/^\d+$/.test(x) ? Number(x) : x));
  const pb = b.split(/[.-]/).map((x) => (/^\d+$/.test(x) ? Number(x) : x));
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i];
    const y = pb[i];
    if (x === y) continue;
    if (x === undefined) return -1;
    if (y === undefined) return 1;
    if (typeof x === "number" && typeof y === "number") return x - y;
    return String(x) < String(y) ? -1 : 1;
  }
  return 0;
}

/** The newest Debian cloud kernel in /boot with its modules; its version is discovered, never assumed. */
export async function discoverKernel(bootDir = "/boot", modulesRoot = "/lib/modules"): Promise<KernelInfo> {
  const override = setting("kernel");
  let names: string[] = [];
  try {
    names = await fs.readdir(bootDir);
  } catch {
    // handled below
  }
  const versions = names
    .map((n) => /^vmlinuz-(.+-cloud-amd64)$/.exec(n)?.[1])
    .filter((v): v is string => v !== undefined)
    .sort(compareKernelVersions);
  const version = override ?? versions.at(-1);
  if (!version) {
    throw new ForkdError(
      "missing_dependency",
      `no Debian cloud kernel (vmlinuz-*-cloud-amd64) in ${bootDir}; install it with: apt-get install linux-image-cloud-amd64`,
    );
  }
  const modulesDir = path.join(modulesRoot, version);
  if (!(await exists(modulesDir))) {
    throw new ForkdError("missing_dependency", `kernel ${version} has no modules in ${modulesDir}; reinstall linux-image-${version}`);
  }
  return { version, vmlinuz: path.join(bootDir, `vmlinuz-${version}`), modulesDir };
}

/** Map module names to their .ko files using modules.dep; built-in modules are left out. */
export function resolveModules(modulesDep: string, wanted: readonly string[]): Map<string, string> {
  const byName = new Map<string, string>();
  for (const line of modulesDep.split("\n")) {
    const file = line.split(":")[0]?.trim();
    if (!file) continue;
    const base = path.basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, "");
    byName.set(base.replace(/-/g, "_"), file);
  }
  const out = new Map<string, string>();
  for (const name of wanted) {
    const file = byName.get(name.replace(/-/g, "_"));
    if (file) out.set(name, file);
  }
  return out;
}

type Inputs = {
  kernel: KernelInfo;
  modules: Map<string, string>;
  busybox: string;
  node: string;
  nodeLibs: string[];
  agentBundle: string;
  guestctlSource: string;
  pyworker: string;
};

const require = createRequire(import.meta.url);

async function gatherInputs(): Promise<Inputs> {
  const kernel = await discoverKernel();
  const modulesDep = await fs.readFile(path.join(kernel.modulesDir, "modules.dep"), "utf8");
  const modules = resolveModules(modulesDep, GUEST_MODULES);
  for (const file of modules.values()) {
    if (!file.endsWith(".ko")) {
      throw new ForkdError("not_supported", `module ${file} is compressed; busybox insmod needs plain .ko modules`);
    }
  }
  const busybox = setting("busybox");
  if (!(await exists(busybox))) {
    throw new ForkdError("missing_dependency", `${busybox} not found; install it with: apt-get install busybox-static`);
  }
  const busyboxBytes = await fs.readFile(busybox);
  if (busyboxBytes.includes(Buffer.from("/lib64/ld-linux"))) {
    throw new ForkdError(
      "missing_dependency",
      `${busybox} is dynamically linked; the initramfs needs the static one: apt-get install busybox-static`,
    );
  }
  const node = await fs.realpath(process.execPath);
  const ldd = await runChecked("ldd", [node]);
  const nodeLibs = [...ldd.stdout.matchAll(/(\/\S+\.so[^\s]*)/g)].map((m) => m[1]!);
  if (!nodeLibs.some((l) => l.includes("ld-linux"))) {
    throw new ForkdError("not_supported", `could not find the dynamic loader of ${node} in ldd's output`);
  }
  const agentBundle = require.resolve("@forkd/agent/bundle");
  if (!(await exists(agentBundle))) {
    throw new ForkdError("missing_dependency", `the agent bundle ${agentBundle} is not built; run \`npm run build\``);
  }
  const guestctlSource = require.resolve("@forkd/agent/guestctl.c");
  const pyworker = require.resolve("@forkd/agent/pyworker.py");
  return { kernel, modules, busybox, node, nodeLibs, agentBundle, guestctlSource, pyworker };
}

async function digestInputs(inputs: Inputs, base: BaseRoot, copies: readonly RecipeFileCopy[]): Promise<string> {
  const hash = createHash("sha256");
  hash.update(`recipe ${RECIPE_VERSION}\n`);
  hash.update(`base ${base.kind === "busybox" ? "busybox" : base.digest}\n`);
  // Left out when empty, so images without copied files keep the digests they had.
  if (copies.length > 0) hash.update(`files ${await copiesDigest(copies)}\n`);
  hash.update(await fs.readFile(inputs.pyworker));
  hash.update(initramfsInit([...inputs.modules.keys()]));
  hash.update(stage2Init());
  hash.update(nodeWrapper());
  hash.update(`busybox applet wget renamed ${WGET_APPLET}\n`);
  for (const shim of busyboxShims(true)) hash.update(`${shim.path}\0${shim.text}`);
  hash.update(NSSWITCH_CONF);
  const files = [
    inputs.kernel.vmlinuz,
    inputs.busybox,
    inputs.node,
    inputs.agentBundle,
    inputs.guestctlSource,
    ...inputs.nodeLibs,
    ...[...inputs.modules.values()].map((m) => path.join(inputs.kernel.modulesDir, m)),
  ];
  for (const file of files) hash.update(`${path.basename(file)} ${await sha256File(file)}\n`);
  return hash.digest("hex");
}

function imageRoot(name: string): string {
  return path.join(imagesDir(), name);
}

/**
 * Where an image build's files are. Derived from its name and digest, never from
 * a stored path, so records stay true when FORKD_HOME moves or is copied.
 */
export function imageFiles(name: string, digest: string): { dir: string; kernel: string; initrd: string; rootfs: string } {
  const dir = path.join(imageRoot(name), digest);
  return { dir, kernel: path.join(dir, "vmlinuz"), initrd: path.join(dir, "initrd.cpio"), rootfs: path.join(dir, "rootfs.ext4") };
}

/** A manifest as read from disk, with its file paths resolved in this store. */
function located(manifest: ImageManifest): ImageManifest {
  const { kernel, initrd, rootfs } = imageFiles(manifest.name, manifest.digest);
  return { ...manifest, kernel, initrd, rootfs };
}

async function readImageManifest(file: string): Promise<ImageManifest | undefined> {
  const manifest = await readJson<ImageManifest>(file);
  return manifest && located(manifest);
}

export async function getImage(name: string): Promise<ImageManifest> {
  validateName(name, "image name");
  const manifest = await readImageManifest(path.join(imageRoot(name), "current.json"));
  if (!manifest) {
    const names = (await listImages()).map((m) => m.name);
    throw new ForkdError(
      "image_not_found",
      `no image '${name}'; images that exist: ${names.length ? names.join(", ") : "none"} (build one with \`forkd image build --name ${name}\`)`,
      { images: names },
    );
  }
  return manifest;
}

export async function listImages(): Promise<ImageManifest[]> {
  let names: string[] = [];
  try {
    names = await fs.readdir(imagesDir());
  } catch {
    return [];
  }
  const out: ImageManifest[] = [];
  for (const name of names.sort()) {
    const manifest = await readImageManifest(path.join(imageRoot(name), "current.json")).catch(() => undefined);
    if (manifest) out.push(manifest);
  }
  return out;
}

export type BuildImageOpts = {
  name?: string;
  force?: boolean;
  /** Extra Debian packages for a debootstrapped root (the python recipe). */
  packages?: string[];
  /** Use this root filesystem tree as the image's base. */
  fromDir?: string;
  /** Use this root filesystem tarball (for example a `docker export`) as the base. */
  fromTar?: string;
  onProgress?: ImageProgress;
  /**
   * The root a name outside IMAGE_RECIPES starts from (a recipe's image):
   * busybox alone, or debootstrapped Debian with `packages`.
   */
  base?: "busybox" | "debian";
  /** Files copied into the root (a recipe's), before forkd's own layout is added. */
  files?: readonly RecipeFileCopy[];
};

/** A debootstrapped Debian root: its packages, and a login user to add (uid 1000, home /home/NAME, bash, passwordless sudo). */
type DebianRecipe = { packages: string[]; user?: string };

/** Recipes that need no --from-dir/--from-tar: what each name builds. */
const IMAGE_RECIPES: Record<string, DebianRecipe | "busybox"> = {
  base: "busybox",
  python: { packages: ["python3", "python3-numpy"] },
  // What E2B's users assume of a sandbox (its `base` template): bash -l, coreutils, python3,
  // sudo, git, and a user `user` whose home is /home/user. Other recipes build on it too.
  debian: { packages: ["bash", "ca-certificates", "coreutils", "git", "procps", "python3", "sudo"], user: "user" },
};

/** The uid and gid of a recipe's login user (Debian's first regular user). */
const RECIPE_USER_ID = 1000;

const PACKAGE_RE = /^[a-z0-9][a-z0-9+.-]+$/;

type BaseRoot = { kind: "busybox" } | { kind: "tree"; dir: string; digest: string; cleanup?: string };

/**
 * Build (or find in the cache) the image. Everything is assembled in a temp dir
 * and renamed into place, and `current.json` is switched last, so an interrupted
 * build never leaves an image that looks valid.
 */
/** Tags of the snapshots made from an image build (they live in a higher layer, so the caller asks). */
export type SnapshotsUsing = (digest: string) => Promise<string[]>;

export async function buildGuestImage(
  opts: BuildImageOpts,
  snapshotsUsing: SnapshotsUsing,
): Promise<{ manifest: ImageManifest; cached: boolean }> {
  const name = opts.name ?? "base";
  validateName(name, "image name");
  const progress = opts.onProgress ?? (() => {});
  if (opts.fromDir && opts.fromTar) throw new ForkdError("bad_request", "--from-dir and --from-tar are alternatives; give one");
  if (opts.base && (opts.fromDir || opts.fromTar || IMAGE_RECIPES[name])) {
    throw new ForkdError("bad_request", `a base root is chosen for a new image name only, not with --from-dir/--from-tar or for '${name}'`);
  }
  const recipe = opts.base === "busybox" ? "busybox" : opts.base === "debian" ? { packages: [] } : IMAGE_RECIPES[name];
  if (!recipe && !opts.fromDir && !opts.fromTar) {
    throw new ForkdError(
      "bad_request",
      `no recipe builds an image named '${name}'; recipes: ${Object.keys(IMAGE_RECIPES).join(", ")}; or give --from-dir DIR / --from-tar FILE`,
    );
  }
  for (const pkg of opts.packages ?? []) {
    if (!PACKAGE_RE.test(pkg)) throw new ForkdError("bad_request", `'${pkg}' is not a Debian package name`);
  }
  if ((opts.packages?.length ?? 0) > 0 && (opts.fromDir || opts.fromTar || recipe === "busybox")) {
    throw new ForkdError(
      "bad_request",
      "--packages applies to debootstrapped images (such as python), not to busybox or --from-dir/--from-tar roots",
    );
  }
  progress("hashing inputs");
  const inputs = await gatherInputs();
  const base = await prepareBaseRoot(opts, recipe, progress);
  const files = opts.files ?? [];
  const digest = await digestInputs(inputs, base, files);
  const root = imageRoot(name);
  const finalDir = path.join(root, digest);
  // A digest dir is immutable once complete (image.json is written last): snapshots
  // hold its rootfs open by path and their guests cache its blocks, so rebuilding
  // it in place would corrupt every snapshot made from it.
  const complete = await readImageManifest(path.join(finalDir, "image.json"));
  if (complete && opts.force) {
    const users = await snapshotsUsing(digest);
    if (users.length > 0) {
      throw new ForkdError(
        "conflict",
        `snapshots ${users.join(", ")} use image ${name}@${digest.slice(0, 12)}; remove them (forkd rmi) before forcing a rebuild`,
      );
    }
  }
  if (complete && !opts.force) {
    const current = await readJson<ImageManifest>(path.join(root, "current.json"));
    if (current?.digest !== digest) await writeFileAtomic(path.join(root, "current.json"), `${JSON.stringify(complete, null, 2)}\n`);
    return { manifest: complete, cached: true };
  }
  ensureStateDir();
  await fs.mkdir(root, { recursive: true, mode: 0o755 });
  const work = await fs.mkdtemp(path.join(root, ".build-"));
  try {
    progress("compiling the guest helper");
    const guestctl = path.join(work, "forkd-guestctl");
    const cc = await runProgram("cc", ["-static", "-O2", "-o", guestctl, inputs.guestctlSource]);
    if (cc.code !== 0) {
      throw new ForkdError("missing_dependency", `cc -static failed (install gcc and libc6-dev): ${cc.stderr.trim().slice(0, 500)}`);
    }
    progress("assembling the root tree");
    const tree = path.join(work, "tree");
    if (base.kind === "tree") {
      progress("copying the base root");
      await runChecked("cp", ["-a", `${base.dir}/.`, `${tree}/`]);
    }
    await fs.mkdir(tree, { recursive: true, mode: 0o755 });
    if (files.length > 0) progress(`copying ${files.length} file(s) into the root`);
    for (const file of files) await putFileNoFollow(tree, file.target.slice(1), file.source, file.mode);
    await assembleRootTree(tree, inputs, guestctl, work);
    if (recipe && recipe !== "busybox" && recipe.user) {
      progress(`adding the user ${recipe.user}`);
      await addLoginUser(tree, recipe.user);
    }
    const runtimes = (await existsInTree(tree, "usr/bin/python3")) ? ["javascript", "python"] : ["javascript"];
    progress("writing the ext4 root image");
    const rootfs = path.join(work, "rootfs.ext4");
    const treeBytes = await duBytes(tree);
    const sizeMib = Math.ceil((treeBytes * 1.2) / 2 ** 20) + 32;
    await runChecked("mkfs.ext4", [
      "-q",
      "-F",
      "-L",
      "forkd-root",
      "-b",
      "4096",
      "-O",
      "^has_journal",
      // The same inputs give the same filesystem identity (UUID and directory hash seed).
      "-U",
      uuidFromDigest(digest),
      "-E",
      `root_owner=0:0,hash_seed=${uuidFromDigest(digest)}`,
      "-d",
      tree,
      rootfs,
      `${sizeMib}M`,
    ]);
    progress("writing the initramfs");
    await fs.writeFile(path.join(work, "initrd.cpio"), await buildInitramfs(inputs));
    await fs.copyFile(inputs.kernel.vmlinuz, path.join(work, "vmlinuz"));
    await fs.rm(tree, { recursive: true, force: true });
    await fs.rm(guestctl, { force: true });
    await fs.chmod(rootfs, 0o444);
    const stat = await fs.stat(rootfs);
    for (const f of ["vmlinuz", "initrd.cpio", "rootfs.ext4"]) {
      const handle = await fs.open(path.join(work, f), "r");
      await handle.sync();
      await handle.close();
    }
    const manifest: ImageManifest = {
      schema: 1,
      name,
      digest,
      createdAt: new Date().toISOString(),
      kernelVersion: inputs.kernel.version,
      // Stored relative to the build's dir (see imageFiles): records are relocatable.
      kernel: "vmlinuz",
      initrd: "initrd.cpio",
      rootfs: "rootfs.ext4",
      rootfsBytes: stat.size,
      runtimes,
    };
    await writeFileAtomic(path.join(work, "image.json"), `${JSON.stringify(manifest, null, 2)}\n`);
    // mkdtemp made it 0700; VMMs run as their own uids and must reach the kernel, initrd and root in it.
    await fs.chmod(work, 0o755);
    await fs.rm(finalDir, { recursive: true, force: true });
    await fs.rename(work, finalDir);
    await fsyncDir(root);
    await writeFileAtomic(path.join(root, "current.json"), `${JSON.stringify(manifest, null, 2)}\n`);
    return { manifest: located(manifest), cached: false };
  } finally {
    await fs.rm(work, { recursive: true, force: true });
    if (base.kind === "tree" && base.cleanup) await fs.rm(base.cleanup, { recursive: true, force: true });
  }
}

/**
 * The root an image starts from: busybox alone, a debootstrapped Debian
 * (cached by its package list), or the user's tree or tarball (hashed, since
 * its content is the input).
 */
async function prepareBaseRoot(
  opts: BuildImageOpts,
  recipe: (typeof IMAGE_RECIPES)[string] | undefined,
  progress: ImageProgress,
): Promise<BaseRoot> {
  if (opts.fromDir) {
    const dir = path.resolve(opts.fromDir);
    if (!(await fs.stat(dir).catch(() => undefined))?.isDirectory())
      throw new ForkdError("bad_request", `--from-dir ${dir} is not a directory`);
    progress("hashing the root tree");
    return { kind: "tree", dir, digest: await treeDigest(dir) };
  }
  if (opts.fromTar) {
    const file = path.resolve(opts.fromTar);
    if (!(await fs.stat(file).catch(() => undefined))?.isFile()) throw new ForkdError("bad_request", `--from-tar ${file} is not a file`);
    const digest = await sha256File(file);
    ensureStateDir();
    await fs.mkdir(imagesDir(), { recursive: true, mode: 0o755 });
    const dir = await fs.mkdtemp(path.join(imagesDir(), ".tar-"));
    progress("unpacking the root tarball");
    await runChecked("tar", ["-x", "-f", file, "-C", dir, "--no-same-permissions", "--numeric-owner"]);
    return { kind: "tree", dir, digest: `tar:${digest}`, cleanup: dir };
  }
  if (recipe === "busybox" || recipe === undefined) return { kind: "busybox" };
  const packages = [...new Set([...recipe.packages, ...(opts.packages ?? [])])].sort();
  const key = createHash("sha256")
    .update(`bookworm minbase ${packages.join(",")}`)
    .digest("hex")
    .slice(0, 24);
  const cacheDir = path.join(imagesDir(), ".cache", `debootstrap-${key}`);
  if (!(await exists(path.join(cacheDir, ".complete")))) {
    if (!(await exists("/usr/sbin/debootstrap"))) {
      throw new ForkdError("missing_dependency", "debootstrap is not installed; install it with: apt-get install debootstrap");
    }
    const temp = `${cacheDir}.tmp-${process.pid}`;
    await fs.rm(temp, { recursive: true, force: true });
    await fs.mkdir(path.dirname(cacheDir), { recursive: true });
    progress(`debootstrap bookworm with ${packages.join(", ")}`);
    await runChecked(
      "/usr/sbin/debootstrap",
      ["--variant=minbase", `--include=${packages.join(",")}`, "bookworm", temp, "http://deb.debian.org/debian"],
      {
        timeoutMs: 30 * 60_000,
      },
    );
    // The package cache is not part of the image. Packages choose the tree's symlinks, so it is resolved inside the tree.
    await fs.rm(inTree(temp, "var/cache/apt/archives"), { recursive: true, force: true });
    await mkdirInTree(temp, "var/cache/apt/archives/partial");
    await fs.writeFile(path.join(temp, ".complete"), `${packages.join("\n")}\n`);
    await fs.rm(cacheDir, { recursive: true, force: true });
    await fs.rename(temp, cacheDir);
  }
  // The login user is added to the image, not to the cached debootstrap: it is part of the image's digest.
  return { kind: "tree", dir: cacheDir, digest: `debootstrap:${key}${recipe.user ? `+user:${recipe.user}` : ""}` };
}

/** Content digest of a directory tree: names, modes, link targets and file bytes. */
async function treeDigest(dir: string): Promise<string> {
  const hash = createHash("sha256");
  const entries = (await fs.readdir(dir, { withFileTypes: true, recursive: true }))
    .map((e) => path.relative(dir, path.join(e.parentPath, e.name)))
    .sort();
  for (const rel of entries) {
    const full = path.join(dir, rel);
    const st = await fs.lstat(full);
    hash.update(`${rel}\0${st.mode}\0`);
    if (st.isSymbolicLink()) hash.update(await fs.readlink(full));
    else if (st.isFile()) hash.update(await sha256File(full));
  }
  return `dir:${hash.digest("hex")}`;
}

/**
 * Resolve a path inside a root tree the way the guest will see it: symlinks
 * (absolute ones included) are followed within the tree, never out of it, so a
 * user's root cannot make the builder write on the host.
 */
export function inTree(tree: string, rel: string, opts: { followLast?: boolean } = {}, depth = 0): string {
  if (depth > 40) throw new ForkdError("bad_request", `too many symlinks resolving ${rel} in the image root`);
  const parts = rel.split("/").filter((p) => p && p !== ".");
  let current = tree;
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i]!;
    if (part === "..") {
      current = current === tree ? tree : path.dirname(current);
      continue;
    }
    const next = path.join(current, part);
    let st: import("node:fs").Stats | undefined;
    try {
      st = fsSync.lstatSync(next);
    } catch {
      st = undefined;
    }
    if (st?.isSymbolicLink() && (i < parts.length - 1 || opts.followLast)) {
      const target = fsSync.readlinkSync(next);
      const base = target.startsWith("/") ? target : path.join(path.relative(tree, current), target);
      return inTree(tree, [base, ...parts.slice(i + 1)].join("/"), opts, depth + 1);
    }
    current = next;
  }
  return current;
}

export function uuidFromDigest(digest: string): string {
  const h = digest.slice(0, 32);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

async function duBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await fs.stat(path.join(entry.parentPath, entry.name))).size;
    else total += 4096;
  }
  return total;
}

/**
 * The builder runs as root and the tree is the user's, so every write into it goes
 * through these: paths are resolved with `inTree` (symlinks followed inside the
 * tree only), files are created fresh with O_EXCL|O_NOFOLLOW after unlinking what
 * was there (so neither a symlink nor a hard link in the way is written through),
 * and modes are set on the open fd, never by path.
 */
const CREATE_FRESH = fsSync.constants.O_WRONLY | fsSync.constants.O_CREAT | fsSync.constants.O_EXCL | fsSync.constants.O_NOFOLLOW;

function layoutError(rel: string, what: string, err?: unknown): ForkdError {
  return new ForkdError(
    "bad_request",
    `the image root cannot take forkd's /${rel}: ${what}; change that path in the root and build again`,
    { path: `/${rel}` },
    { cause: err },
  );
}

/**
 * Whether the guest will find `rel`: resolved inside the tree (a root's python3 is
 * usually a symlink, and the host's file must not answer for it); a link loop is no file.
 */
async function existsInTree(tree: string, rel: string): Promise<boolean> {
  try {
    return await exists(inTree(tree, rel, { followLast: true }));
  } catch {
    return false;
  }
}

/** mkdir -p of a resolved path in the tree; every existing component must be a real directory. */
async function mkdirInTree(tree: string, rel: string, mode = 0o755): Promise<string> {
  const target = inTree(tree, rel, { followLast: true });
  const parts = path.relative(tree, target).split(path.sep).filter(Boolean);
  let current = tree;
  for (const part of parts) {
    current = path.join(current, part);
    const st = await fs.lstat(current).catch(() => undefined);
    if (!st) {
      await fs.mkdir(current, { mode }).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== "EEXIST") throw err;
      });
      continue;
    }
    // inTree resolved every symlink, and nothing else writes the tree while we build.
    if (!st.isDirectory() || st.isSymbolicLink()) throw layoutError(rel, `/${path.relative(tree, current)} is not a directory`);
  }
  return target;
}

/** chmod a directory of the tree by fd, refusing to follow a symlink at its last component. */
async function chmodDirInTree(tree: string, rel: string, mode: number): Promise<void> {
  const target = inTree(tree, rel, { followLast: true });
  const handle = await fs.open(target, fsSync.constants.O_RDONLY | fsSync.constants.O_DIRECTORY | fsSync.constants.O_NOFOLLOW);
  try {
    await handle.chmod(mode);
  } finally {
    await handle.close();
  }
}

/** Create a fresh file at `rel` in the tree (whatever was there is unlinked first) and fill it. */
async function createInTree(
  tree: string,
  rel: string,
  mode: number,
  fill: (handle: fs.FileHandle) => Promise<void>,
  opts: { keepExisting?: boolean } = {},
): Promise<void> {
  const target = inTree(tree, rel);
  const st = await fs.lstat(target).catch(() => undefined);
  if (st && opts.keepExisting && !st.isSymbolicLink()) return;
  if (st?.isDirectory()) throw layoutError(rel, "it is a directory where forkd puts a file");
  if (st) await fs.unlink(target);
  await mkdirInTree(tree, path.relative(tree, path.dirname(target)));
  const handle = await fs.open(target, CREATE_FRESH, mode);
  try {
    await fill(handle);
    await handle.chmod(mode);
  } finally {
    await handle.close();
  }
}

/** Write a file into a root tree without following any symlink out of it; a symlink in the way is replaced. */
async function putFile(
  tree: string,
  rel: string,
  data: string | Buffer,
  mode = 0o644,
  opts: { keepExisting?: boolean } = {},
): Promise<void> {
  await createInTree(tree, rel, mode, (handle) => handle.writeFile(data), opts);
}

/** Copy a host file into the tree, streamed (node is ~100 MiB), with putFile's rules. */
async function putFileFrom(tree: string, rel: string, source: string, mode: number): Promise<void> {
  await copyInto(tree, rel, source, mode, "r");
}

/** putFileFrom for a recipe's file: a source swapped for a symlink since it was checked is refused, not followed. */
async function putFileNoFollow(tree: string, rel: string, source: string, mode: number): Promise<void> {
  await copyInto(tree, rel, source, mode, fsSync.constants.O_RDONLY | fsSync.constants.O_NOFOLLOW);
}

async function copyInto(tree: string, rel: string, source: string, mode: number, flags: string | number): Promise<void> {
  await createInTree(tree, rel, mode, async (handle) => {
    const src = await fs.open(source, flags);
    try {
      const buf = Buffer.allocUnsafe(1 << 20);
      for (;;) {
        const { bytesRead } = await src.read(buf, 0, buf.length, null);
        if (bytesRead === 0) break;
        await handle.write(buf, 0, bytesRead);
      }
    } finally {
      await src.close();
    }
  });
}

/**
 * A login user as Debian's adduser would make it, written into the tree's files
 * (no chroot: nothing of the root runs on the host): uid/gid 1000, a group of its
 * own, in the sudo group with passwordless sudo, bash, /home/NAME from /etc/skel.
 * Its password is locked (`*`): it is reached through the agent, never by login.
 */
async function addLoginUser(tree: string, name: string): Promise<void> {
  if (!/^[a-z_][a-z0-9_-]{0,31}$/.test(name)) throw new ForkdError("bad_request", `'${name}' is not a user name`);
  const id = RECIPE_USER_ID;
  const home = `home/${name}`;
  // Rewritten files keep their owner: /etc/shadow is group shadow, which PAM's unix_chkpwd (sudo's account check) needs.
  const rewrite = async (rel: string, text: string, mode: number) => {
    const before = await fs.lstat(inTree(tree, rel)).catch(() => undefined);
    await putFile(tree, rel, text, mode);
    if (before) await fs.lchown(inTree(tree, rel), before.uid, before.gid);
  };
  const appendLine = async (rel: string, line: string, mode: number) => {
    const current = await fs.readFile(inTree(tree, rel, { followLast: true }), "utf8").catch(() => "");
    if (current.split("\n").some((l) => l.split(":")[0] === name)) throw layoutError(rel, `it already has an entry for ${name}`);
    await rewrite(rel, `${current}${current && !current.endsWith("\n") ? "\n" : ""}${line}\n`, mode);
  };
  await appendLine("etc/passwd", `${name}:x:${id}:${id}::/${home}:/bin/bash`, 0o644);
  await appendLine("etc/group", `${name}:x:${id}:`, 0o644);
  await appendLine("etc/shadow", `${name}:*:19000:0:99999:7:::`, 0o640);
  // Member of sudo as well (`sudo -l` lists it); the sudoers.d line is what needs no password.
  const groupFile = inTree(tree, "etc/group", { followLast: true });
  const groups = (await fs.readFile(groupFile, "utf8")).split("\n").map((l) => {
    const f = l.split(":");
    if (f[0] !== "sudo" || f.length !== 4) return l;
    f[3] = f[3] ? `${f[3]},${name}` : name;
    return f.join(":");
  });
  await rewrite("etc/group", groups.join("\n"), 0o644);
  await putFile(tree, `etc/sudoers.d/${name}`, `${name} ALL=(ALL:ALL) NOPASSWD: ALL\n`, 0o440);
  const homeDir = await mkdirInTree(tree, home, 0o755);
  await fs.lchown(homeDir, id, id);
  const skel = inTree(tree, "etc/skel", { followLast: true });
  for (const entry of await fs.readdir(skel, { withFileTypes: true }).catch(() => [])) {
    if (!entry.isFile()) continue;
    await putFileFrom(tree, `${home}/${entry.name}`, path.join(skel, entry.name), 0o644);
    await fs.lchown(inTree(tree, `${home}/${entry.name}`), id, id);
  }
}

/**
 * /opt/forkd is forkd's: whatever a root has there (a symlink, a file, an older
 * forkd's files) is removed and replaced by a real directory holding only ours.
 */
async function freshForkdDir(tree: string): Promise<void> {
  const opt = await mkdirInTree(tree, "opt");
  const forkdDir = path.join(opt, "forkd");
  // rm does not follow a symlink at the path it is given; `opt` itself was resolved inside the tree.
  await fs.rm(forkdDir, { recursive: true, force: true });
  await fs.mkdir(forkdDir, { mode: 0o755 });
}

async function assembleRootTree(tree: string, inputs: Inputs, guestctl: string, work: string): Promise<void> {
  // A busybox image starts from nothing; a copied base root already made it.
  await fs.mkdir(tree, { recursive: true, mode: 0o755 });
  await freshForkdDir(tree);
  for (const d of [
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc",
    "proc",
    "sys",
    "dev",
    "tmp",
    "run",
    "root",
    "mnt",
    "var/tmp",
    "opt/forkd/bin",
    "opt/forkd/lib",
  ]) {
    // A directory that is a symlink in the root is followed inside the root, never onto the host.
    await mkdirInTree(tree, d);
  }
  await chmodDirInTree(tree, "tmp", 0o1777);
  await chmodDirInTree(tree, "root", 0o700);
  const wgetHelp = await runProgram(inputs.busybox, ["wget", "--help"]);
  const { binary: busybox, wgetRenamed } = patchBusybox(await fs.readFile(inputs.busybox), wgetHelp.stdout + wgetHelp.stderr);
  // The guest init scripts call busybox by this path, whatever the root provides.
  await putFile(tree, "opt/forkd/bin/busybox", busybox, 0o755);
  await putFile(tree, "bin/busybox", busybox, 0o755, { keepExisting: true });
  // Before the applets, so where busybox would link one of these the shim is what is found.
  // A root with the real tool anywhere on PATH keeps it: a shim in usr/bin would shadow a /bin one.
  for (const shim of busyboxShims(wgetRenamed)) {
    const name = path.basename(shim.path);
    const found = await Promise.all(
      ["usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"].map((dir) => fs.lstat(inTree(tree, `${dir}/${name}`)).catch(() => undefined)),
    );
    if (found.some(Boolean)) continue;
    await putFile(tree, shim.path, shim.text, 0o755);
  }
  const applets = (await runChecked(inputs.busybox, ["--list-full"])).stdout.split("\n").filter(Boolean);
  for (const applet of applets) {
    if (applet === "bin/busybox") continue;
    const target = inTree(tree, applet);
    // A root that has the real tool keeps it; busybox fills the gaps.
    if (await fs.lstat(target).catch(() => undefined)) continue;
    await mkdirInTree(tree, path.relative(tree, path.dirname(target)));
    // symlink(2) creates the link itself, never writing through one.
    await fs.symlink("/opt/forkd/bin/busybox", target);
  }
  // Stripped outside the tree (strip writes through symlinks), then copied in like any other file.
  const nodeBin = path.join(work, "node.bin");
  await fs.copyFile(inputs.node, nodeBin);
  // Debug info is most of the host binary's size and the guest never needs it.
  const strip = await runProgram("strip", ["--strip-debug", nodeBin]).catch(() => undefined);
  if (strip && strip.code !== 0) await fs.copyFile(inputs.node, nodeBin);
  await putFileFrom(tree, "opt/forkd/bin/node.bin", nodeBin, 0o755);
  await fs.rm(nodeBin, { force: true });
  for (const lib of inputs.nodeLibs) await putFileFrom(tree, `opt/forkd/lib/${path.basename(lib)}`, await fs.realpath(lib), 0o755);
  await putFile(tree, "opt/forkd/bin/node", nodeWrapper(), 0o755);
  await putFileFrom(tree, "opt/forkd/agent.js", inputs.agentBundle, 0o644);
  await putFileFrom(tree, "opt/forkd/pyworker.py", inputs.pyworker, 0o644);
  await putFileFrom(tree, "opt/forkd/bin/forkd-guestctl", guestctl, 0o755);
  await putFile(tree, "opt/forkd/init", stage2Init(), 0o755);
  await putFile(tree, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644, {
    keepExisting: true,
  });
  await putFile(tree, "etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644, { keepExisting: true });
  await putFile(tree, "etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644, { keepExisting: true });
  await putFile(tree, "etc/nsswitch.conf", NSSWITCH_CONF, 0o644, { keepExisting: true });
  // QEMU user-mode networking's resolver; the root's own may point at a host service.
  await putFile(tree, "etc/resolv.conf", "nameserver 10.0.2.3\n");
  await putFile(tree, "etc/hostname", "forkd\n");
}

async function buildInitramfs(inputs: Inputs): Promise<Buffer> {
  const entries: CpioEntry[] = [];
  for (const d of ["bin", "dev", "proc", "sys", "ro", "rw", "newroot", "lib", "lib/modules"]) {
    entries.push({ path: d, type: "dir", mode: 0o755 });
  }
  entries.push({ path: "bin/busybox", type: "file", mode: 0o755, data: await fs.readFile(inputs.busybox) });
  entries.push({ path: "bin/sh", type: "symlink", target: "busybox" });
  for (const [name, file] of inputs.modules) {
    entries.push({
      path: `lib/modules/${name}.ko`,
      type: "file",
      mode: 0o644,
      data: await fs.readFile(path.join(inputs.kernel.modulesDir, file)),
    });
  }
  entries.push({ path: "init", type: "file", mode: 0o755, data: Buffer.from(initramfsInit([...inputs.modules.keys()])) });
  return writeCpio(entries);
}

/**
 * Remove image builds that nothing uses: a digest dir is kept while it is an
 * image's current build or its digest is in `used` (snapshots made from it (its guests cache the
 * root's blocks, so it must never change under them).
 */
export async function pruneImageBuilds(used: ReadonlySet<string>): Promise<{ removed: string[]; keptForSnapshots: string[] }> {
  const removed: string[] = [];
  const keptForSnapshots: string[] = [];
  let names: string[] = [];
  try {
    names = await fs.readdir(imagesDir());
  } catch {
    return { removed, keptForSnapshots };
  }
  for (const name of names.filter((n) => !n.startsWith("."))) {
    const root = imageRoot(name);
    const current = await readJson<ImageManifest>(path.join(root, "current.json")).catch(() => undefined);
    let entries: string[] = [];
    try {
      entries = await fs.readdir(root);
    } catch {
      continue;
    }
    for (const digest of entries.filter((e) => /^[0-9a-f]{64}$/.test(e))) {
      if (digest === current?.digest) continue;
      if (used.has(digest)) {
        keptForSnapshots.push(`${name}@${digest.slice(0, 12)}`);
        continue;
      }
      await fs.rm(path.join(root, digest), { recursive: true, force: true });
      removed.push(`${name}@${digest.slice(0, 12)}`);
    }
  }
  return { removed, keptForSnapshots };
}

/**
 * Undo a build that its caller could not finish (a recipe whose warm-up failed):
 * the build's directory goes, and the image's current build is put back to
 * `previous` (or the image is gone if it had none), so nothing stays registered.
 */
export async function forgetImageBuild(name: string, digest: string, previousDigest: string | undefined): Promise<void> {
  validateName(name, "image name");
  if (!/^[0-9a-f]{64}$/.test(digest)) throw new ForkdError("bad_request", `'${digest}' is not an image digest`);
  const root = imageRoot(name);
  // image.json is the build's manifest as stored (paths relative to its dir), written last: its presence means complete.
  const previous =
    previousDigest && previousDigest !== digest ? await readJson<ImageManifest>(path.join(root, previousDigest, "image.json")) : undefined;
  if (previous) await writeFileAtomic(path.join(root, "current.json"), `${JSON.stringify(previous, null, 2)}\n`);
  else await fs.rm(path.join(root, "current.json"), { force: true });
  await fs.rm(path.join(root, digest), { recursive: true, force: true });
  // An image name with nothing left in it is no image at all.
  await fs.rmdir(root).catch(() => {});
}
