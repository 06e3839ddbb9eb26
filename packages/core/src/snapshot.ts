// Warm snapshots: boot a parent whose RAM lives in a shared file, warm it, save
// only its device state (x-ignore-shared), and register RAM + device state as an
// immutable snapshot that children map copy-on-write.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir, snapshotsDir, stageBudgetBytes } from "./config.js";
import { ForkdError } from "./errors.js";
import { exists, fsyncDir, readJson, sha256File, writeFileAtomic } from "./fsutil.js";
import { getImage } from "./image.js";
import type { Accel } from "./qemu.js";
import { isAlive } from "./qemu.js";
import { execCatUri, waitForMigration } from "./qmp.js";
import { branches, sandboxes, staged } from "./state.js";
import { validateName } from "./validate.js";
import { Vm } from "./vm.js";

export const SNAPSHOT_SCHEMA = 1;

export type SnapshotManifest = {
  schema: typeof SNAPSHOT_SCHEMA;
  tag: string;
  createdAt: string;
  image: { name: string; digest: string; kernel: string; initrd: string; rootfs: string };
  kernelVersion: string;
  accel: Accel;
  vcpus: number;
  memoryMib: number;
  /** The NIC is part of the device state, so children keep it (isolated when they ask for no network). */
  network: boolean;
  warm: { commands: string[]; evals: string[] };
  sizes: { memoryBytes: number; memoryAllocatedBytes: number; vmstateBytes: number };
  memorySha256: string;
  parent: string | null;
  branchedFrom: string | null;
  /** For a BRANCH: how the capture was taken and how long the source was paused. */
  branch?: { mode: "full" | "diff" | "live"; pauseMs: number; captureMs: number };
  timings: { bootMs: number; warmMs: number; saveMs: number; totalMs: number };
};

export type SnapshotInfo = SnapshotManifest & { dir: string; memoryPath: string; vmstatePath: string; staged: boolean };

function tagDir(tag: string): string {
  return path.join(snapshotsDir(), tag);
}

function stageKey(manifest: Pick<SnapshotManifest, "tag" | "memorySha256">): string {
  return `${manifest.tag}@${manifest.memorySha256.slice(0, 16)}`;
}

function stagedPath(manifest: Pick<SnapshotManifest, "tag" | "memorySha256">): string {
  return path.join(shmDir(), "images", stageKey(manifest), "memory.bin");
}

async function info(manifest: SnapshotManifest): Promise<SnapshotInfo> {
  const dir = tagDir(manifest.tag);
  return {
    ...manifest,
    dir,
    memoryPath: path.join(dir, "memory.bin"),
    vmstatePath: path.join(dir, "vmstate.bin"),
    staged: await exists(stagedPath(manifest)),
  };
}

export async function getSnapshot(tag: string): Promise<SnapshotInfo> {
  validateName(tag, "tag");
  const manifest = await readJson<SnapshotManifest>(path.join(tagDir(tag), "manifest.json"));
  if (!manifest) {
    const branch = branches.get(tag);
    if (branch?.status === "writing") {
      throw new ForkdError(
        "conflict",
        `snapshot ${tag} is still being written by a BRANCH of ${branch.source_id}; wait until its status is ready`,
        { tag, status: "writing" },
      );
    }
    if (branch?.status === "failed") {
      throw new ForkdError(
        "snapshot_not_found",
        `snapshot ${tag} does not exist: its BRANCH failed (${branch.error ?? "unknown reason"})`,
        { tag, status: "failed" },
      );
    }
    throw new ForkdError("snapshot_not_found", `no snapshot ${tag}; \`forkd images\` lists them`, { tag });
  }
  return info(manifest);
}

export async function listSnapshots(): Promise<SnapshotInfo[]> {
  let names: string[] = [];
  try {
    names = await fsp.readdir(snapshotsDir());
  } catch {
    return [];
  }
  const out: SnapshotInfo[] = [];
  // Dot-dirs are snapshots still being written (or abandoned by a crash): never listed.
  for (const name of names.filter((n) => !n.startsWith(".")).sort()) {
    const manifest = await readJson<SnapshotManifest>(path.join(tagDir(name), "manifest.json")).catch(() => undefined);
    if (manifest?.schema === SNAPSHOT_SCHEMA) out.push(await info(manifest));
  }
  return out;
}

export type CreateSnapshotOpts = {
  tag: string;
  image?: string;
  warm?: string[];
  warmEval?: string[];
  memoryMib?: number;
  vcpus?: number;
  accel?: Accel;
  onProgress?: (step: string) => void;
  signal?: AbortSignal;
};

export async function createSnapshot(opts: CreateSnapshotOpts): Promise<SnapshotInfo> {
  const tag = validateName(opts.tag, "tag");
  const progress = opts.onProgress ?? (() => {});
  if ((await exists(path.join(tagDir(tag), "manifest.json"))) || branches.get(tag)?.status === "writing") {
    throw new ForkdError("conflict", `snapshot ${tag} already exists; remove it with \`forkd rmi ${tag}\` or pick another tag`, { tag });
  }
  const image = await getImage(opts.image ?? "base");
  const started = performance.now();
  const { work, stageWork } = await snapshotWorkDirs();
  const memoryPath = path.join(stageWork, "memory.bin");
  let vm: Vm | undefined;
  try {
    progress("booting the parent");
    const booted = await Vm.boot({
      image: image.name,
      memoryMib: opts.memoryMib ?? 256,
      vcpus: opts.vcpus ?? 1,
      accel: opts.accel,
      network: true,
      memoryPath,
      ephemeral: true,
      signal: opts.signal,
    });
    vm = booted.vm;
    const bootMs = booted.timings.totalMs;
    const warmStart = performance.now();
    for (const [i, command] of (opts.warm ?? []).entries()) {
      progress(`warm-up command ${i + 1}/${opts.warm!.length}`);
      let output = "";
      const res = await vm.agent.exec(
        { cmd: command, timeoutMs: 600_000 },
        { onStdout: (d) => (output += d), onStderr: (d) => (output += d) },
      );
      if (res.exitCode !== 0) {
        throw new ForkdError(
          "bad_request",
          `warm-up command ${JSON.stringify(command)} failed with ${res.exitCode ?? res.signal}: ${output.slice(-1000)}`,
        );
      }
    }
    for (const [i, code] of (opts.warmEval ?? []).entries()) {
      progress(`warm-up eval ${i + 1}/${opts.warmEval!.length}`);
      await vm.agent.eval(code, { evalTimeoutMs: 600_000 });
    }
    // Run every agent path a child takes right after restore once in the parent, so
    // V8 has parsed and compiled them before the snapshot: a child then pays only
    // for TCG translation, not for lazy JS compilation as well.
    progress("warming the agent");
    await warmAgentPaths(vm, image.runtimes.includes("python"));
    // The agent must be idle and settled when its memory is frozen.
    await vm.agent.ping();
    const warmMs = performance.now() - warmStart;
    progress("saving device state");
    const saveStart = performance.now();
    const vmstatePath = path.join(work, "vmstate.bin");
    await saveDeviceState(vm, vmstatePath);
    const saveMs = performance.now() - saveStart;
    await vm.destroy();
    vm = undefined;
    progress("writing the memory image");
    return await registerSnapshot({
      work,
      stageWork,
      base: {
        tag,
        image: { name: image.name, digest: image.digest, kernel: image.kernel, initrd: image.initrd, rootfs: image.rootfs },
        kernelVersion: image.kernelVersion,
        accel: booted.vm.accel,
        vcpus: opts.vcpus ?? 1,
        memoryMib: opts.memoryMib ?? 256,
        network: true,
        warm: { commands: opts.warm ?? [], evals: opts.warmEval ?? [] },
        parent: null,
        branchedFrom: null,
        timings: { bootMs, warmMs, saveMs, totalMs: performance.now() - started },
      },
    });
  } finally {
    await vm?.destroy();
    await fsp.rm(work, { recursive: true, force: true });
    await fsp.rm(stageWork, { recursive: true, force: true });
  }
}

async function warmAgentPaths(vm: Vm, python: boolean): Promise<void> {
  if (python) {
    // Waits for the worker's interpreter and imports; its answer path is then warm too.
    await vm.agent.eval("None", { language: "python", evalTimeoutMs: 600_000, timeoutMs: 660_000 });
  }
  await vm.agent.identity({ hostname: "forkd", entropy: randomBytes(64).toString("base64"), clockMs: Date.now() });
  await vm.agent.exec({ argv: ["true"] });
  await vm.agent.exec({ cmd: "true" });
  await vm.agent.eval("1 + 1");
  await vm.agent.files({ action: "stat", path: "/" });
  await vm.agent.files({ action: "list", path: "/opt/forkd" });
}

export type RegisterOpts = {
  /** Dot-dir in the durable store holding vmstate.bin; becomes the snapshot dir. */
  work: string;
  /** Dot-dir on shmem holding memory.bin; becomes the staged image. */
  stageWork: string;
  base: Omit<SnapshotManifest, "schema" | "createdAt" | "sizes" | "memorySha256">;
};

/**
 * The commit point of every snapshot (warm parent or BRANCH): hash the memory
 * image once, copy it to the durable store, write the manifest, fsync, and rename
 * the dot-dir into place. A crash before the rename leaves only a dot-dir, which
 * is never listed and which `forkd cleanup` removes.
 */
export async function registerSnapshot(opts: RegisterOpts): Promise<SnapshotInfo> {
  const { work, stageWork, base } = opts;
  const memoryPath = path.join(stageWork, "memory.bin");
  const vmstatePath = path.join(work, "vmstate.bin");
  const memorySha256 = await sha256File(memoryPath);
  await fsp.copyFile(memoryPath, path.join(work, "memory.bin"));
  for (const f of ["memory.bin", "vmstate.bin"]) {
    const handle = await fsp.open(path.join(work, f), "r");
    await handle.sync();
    await handle.close();
    await fsp.chmod(path.join(work, f), 0o444);
  }
  const memStat = await fsp.stat(memoryPath);
  const manifest: SnapshotManifest = {
    schema: SNAPSHOT_SCHEMA,
    ...base,
    createdAt: new Date().toISOString(),
    sizes: { memoryBytes: memStat.size, memoryAllocatedBytes: memStat.blocks * 512, vmstateBytes: (await fsp.stat(vmstatePath)).size },
    memorySha256,
  };
  await writeFileAtomic(path.join(work, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`, 0o444);
  try {
    await fsp.rename(work, tagDir(base.tag));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOTEMPTY" || (err as NodeJS.ErrnoException).code === "EEXIST") {
      throw new ForkdError("conflict", `snapshot ${base.tag} was created by someone else meanwhile`, { tag: base.tag });
    }
    throw err;
  }
  await fsyncDir(snapshotsDir());
  // The RAM file is already on shmem: it becomes the staged image.
  await fsp.chmod(memoryPath, 0o444);
  const finalStage = path.dirname(stagedPath(manifest));
  await fsp.rm(finalStage, { recursive: true, force: true });
  await fsp.rename(stageWork, finalStage);
  staged.upsert({
    key: stageKey(manifest),
    tag: base.tag,
    path: stagedPath(manifest),
    bytes: memStat.blocks * 512,
    last_used_ms: Date.now(),
  });
  await enforceStageBudget(stageKey(manifest));
  return info(manifest);
}

/** Fresh dot-dirs for a snapshot being written: one in the durable store, one on shmem. */
export async function snapshotWorkDirs(): Promise<{ work: string; stageWork: string }> {
  await fsp.mkdir(snapshotsDir(), { recursive: true, mode: 0o700 });
  await fsp.mkdir(path.join(shmDir(), "images"), { recursive: true, mode: 0o700 });
  // Temp names carry our pid so `forkd cleanup` can tell abandoned ones from ones in progress.
  const temp = `.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
  const work = path.join(snapshotsDir(), temp);
  const stageWork = path.join(shmDir(), "images", temp);
  await fsp.mkdir(work, { mode: 0o700 });
  await fsp.mkdir(stageWork, { mode: 0o700 });
  return { work, stageWork };
}

/** Stop the VM and write its device state (RAM in the shared file is skipped) to `target`. */
export async function saveDeviceState(vm: Vm, target: string): Promise<void> {
  await vm.qmp.execute("stop", {});
  await vm.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] });
  await vm.qmp.execute("migrate", { uri: execCatUri(target) });
  await waitForMigration(vm.qmp, 600_000, "saving the device state");
}

/**
 * The shmem copy of a snapshot's memory image that children map. Staged on first
 * use by a kernel-side copy from the durable store, then kept within the budget.
 */
export async function ensureStaged(snapshot: SnapshotInfo): Promise<string> {
  const target = stagedPath(snapshot);
  const key = stageKey(snapshot);
  if (!(await exists(target))) {
    const dir = path.dirname(target);
    const temp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
    await fsp.mkdir(temp, { recursive: true, mode: 0o700 });
    try {
      await fsp.copyFile(snapshot.memoryPath, path.join(temp, "memory.bin"), fs.constants.COPYFILE_FICLONE);
      await fsp.chmod(path.join(temp, "memory.bin"), 0o444);
      await fsp.rename(temp, dir).catch(async (err: NodeJS.ErrnoException) => {
        // Someone else staged it meanwhile: theirs is as good as ours.
        if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
      });
    } finally {
      await fsp.rm(temp, { recursive: true, force: true });
    }
  }
  const stat = await fsp.stat(target);
  staged.upsert({ key, tag: snapshot.tag, path: target, bytes: stat.blocks * 512, last_used_ms: Date.now() });
  await enforceStageBudget(key);
  return target;
}

/** Evict least recently used staged images beyond the budget, never one with live children or the one just used. */
export async function enforceStageBudget(keep: string): Promise<void> {
  const rows = staged.list();
  let total = rows.reduce((sum, r) => sum + r.bytes, 0);
  const budget = stageBudgetBytes();
  for (const row of rows) {
    if (total <= budget) break;
    if (row.key === keep) continue;
    const live = sandboxes.byTag(row.tag).some((s) => isAlive(s.pid));
    if (live) continue;
    await fsp.rm(path.dirname(row.path), { recursive: true, force: true });
    staged.remove(row.key);
    total -= row.bytes;
  }
}

export type RemoveSnapshotOpts = { force?: boolean };

export async function removeSnapshot(tag: string, opts: RemoveSnapshotOpts = {}): Promise<{ killed: string[] }> {
  const snapshot = await getSnapshot(tag);
  const live = sandboxes.byTag(tag).filter((s) => isAlive(s.pid));
  if (live.length > 0 && !opts.force) {
    throw new ForkdError(
      "conflict",
      `snapshot ${tag} has ${live.length} live sandbox(es) (${live.map((s) => s.id).join(", ")}); kill them first or use --force`,
      { tag, sandboxes: live.map((s) => s.id) },
    );
  }
  const { killSandbox } = await import("./sandbox.js");
  const killed: string[] = [];
  for (const s of live) {
    await killSandbox(s.id);
    killed.push(s.id);
  }
  // Unregister first (rename to a dot-dir) so a crash mid-delete never leaves a half snapshot listed.
  const doomed = path.join(snapshotsDir(), `.rm-${process.pid}-${randomBytes(4).toString("hex")}`);
  await fsp.rename(snapshot.dir, doomed);
  await fsyncDir(snapshotsDir());
  await fsp.rm(doomed, { recursive: true, force: true });
  await fsp.rm(path.dirname(stagedPath(snapshot)), { recursive: true, force: true });
  staged.remove(stageKey(snapshot));
  branches.remove(tag);
  return { killed };
}
