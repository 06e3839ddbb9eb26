// The snapshot registry: a snapshot is a directory in the durable store holding
// an immutable memory image, device state and a manifest; a manifest on disk is
// what makes it exist. Registration is the single commit point.
import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir, snapshotsDir } from "../common/config.js";
import { ensurePrivateDir, ensureStagingDir, ensureStateDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { exists, fsyncDir, readJson, sha256File, writeFileAtomic } from "../common/fsutil.js";
import { validateName } from "../common/validate.js";
import { imageFiles } from "../guest/image.js";
import type { Accel, MachineProfile } from "../vmm/plan.js";
import { keepFromVmms } from "../vmm/process.js";
import { PAGE_BYTES, pagemapBytes, writeDiffLayer } from "./layers.js";
import { enforceStageBudget, rememberVerified, stagedPath, stageKey } from "./staging.js";
import { type BranchRow, branches, staged } from "./state.js";
import { assertSnapshotAllows, type SnapshotOp, type SnapshotState } from "./state-rules.js";

const SNAPSHOT_SCHEMA = 1;

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
  /** The machine's device set (vmm/plan.ts); absent in manifests written before profiles existed, which are "v1". */
  machine?: MachineProfile;
  warm: { commands: string[]; evals: string[] };
  sizes: { memoryBytes: number; memoryAllocatedBytes: number; vmstateBytes: number };
  memorySha256: string;
  parent: string | null;
  branchedFrom: string | null;
  /** For a BRANCH: how the capture was taken and how long the source was paused. */
  /** stopAndCopy: a diff pre-copy that did not converge within its bound, finished with the source stopped. */
  branch?: { mode: "full" | "diff" | "live"; pauseMs: number; captureMs: number; stopAndCopy?: boolean };
  /**
   * Present when only the pages that differ from `parent` are stored (layer.bin +
   * pagemap.bin), pinned to the parent's memory digest, checked when this layer
   * was registered: a parent whose memory is not that one cannot be its base.
   */
  layer?: { parentSha256: string; changedPages: number; layerBytes: number; pagemapBytes: number };
  timings: { bootMs: number; warmMs: number; saveMs: number; totalMs: number };
};

export type SnapshotInfo = SnapshotManifest & {
  dir: string;
  /** The whole memory image in the durable store; absent (not on disk) for a diff layer. */
  memoryPath: string;
  layerPath: string;
  pagemapPath: string;
  vmstatePath: string;
  staged: boolean;
};

export function tagDir(tag: string): string {
  return path.join(snapshotsDir(), tag);
}

async function info(manifest: SnapshotManifest): Promise<SnapshotInfo> {
  const dir = tagDir(manifest.tag);
  // A record names its image build; one too damaged to say which keeps what it has.
  const named = typeof manifest.image?.name === "string" && typeof manifest.image?.digest === "string";
  const files = named ? imageFiles(manifest.image.name, manifest.image.digest) : undefined;
  return {
    ...manifest,
    image: { ...manifest.image, ...(files ? { kernel: files.kernel, initrd: files.initrd, rootfs: files.rootfs } : {}) },
    dir,
    memoryPath: path.join(dir, "memory.bin"),
    layerPath: path.join(dir, "layer.bin"),
    pagemapPath: path.join(dir, "pagemap.bin"),
    vmstatePath: path.join(dir, "vmstate.bin"),
    staged: await exists(stagedPath(manifest)),
  };
}

export async function getSnapshot(tag: string): Promise<SnapshotInfo> {
  validateName(tag, "tag");
  const manifest = await readJson<SnapshotManifest>(path.join(tagDir(tag), "manifest.json"));
  if (!manifest) {
    const branch = branches.get(tag);
    assertSnapshotAllows(tag, snapshotStateOf(false, branch), "use", branch);
    throw new ForkdError("internal", `the state table lets snapshot ${tag} be used without a manifest`, { tag });
  }
  return info(manifest);
}

/** A tag's state: its committed manifest makes it ready, whatever its BRANCH row (if any) says. */
export function snapshotStateOf(manifestCommitted: boolean, branch: Pick<BranchRow, "status"> | undefined): SnapshotState {
  if (manifestCommitted) return "ready";
  if (branch?.status === "writing" || branch?.status === "failed") return branch.status;
  // A "ready" row whose manifest is gone is a leftover cleanup removes: nothing is there.
  return "absent";
}

/** Refuse `op` on `tag` unless the state table allows it in the state the tag is in now. */
export async function assertSnapshotOp(tag: string, op: SnapshotOp): Promise<void> {
  validateName(tag, "tag");
  const branch = branches.get(tag);
  assertSnapshotAllows(tag, snapshotStateOf(await exists(path.join(tagDir(tag), "manifest.json")), branch), op, branch);
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

export type RegisterOpts = {
  /** Dot-dir in the durable store holding vmstate.bin; becomes the snapshot dir. */
  work: string;
  /** Dot-dir on shmem holding memory.bin; becomes the staged image. */
  stageWork: string;
  base: Omit<SnapshotManifest, "schema" | "createdAt" | "sizes" | "memorySha256" | "layer">;
  /** Store only the pages that differ from this parent (its staged memory image, verified). */
  diffFrom?: { memorySha256: string; stagedPath: string };
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
  // The parent or materialiser wrote it as its own uid, in a dir it was given: taken
  // back before anything reads it, so no link a VMM left there is followed.
  keepFromVmms(memoryPath);
  const memorySha256 = await sha256File(memoryPath);
  let layer: SnapshotManifest["layer"];
  if (opts.diffFrom) {
    // The parent's staged image is hashed again here, once: the layer is only as good as its base.
    const parentSha256 = await sha256File(opts.diffFrom.stagedPath);
    if (parentSha256 !== opts.diffFrom.memorySha256) {
      throw new ForkdError("integrity_failed", `the parent memory image ${opts.diffFrom.stagedPath} changed since it was registered`);
    }
    const stats = await writeDiffLayer(opts.diffFrom.stagedPath, memoryPath, path.join(work, "layer.bin"), path.join(work, "pagemap.bin"));
    layer = {
      parentSha256,
      changedPages: stats.changedPages,
      layerBytes: stats.layerBytes,
      pagemapBytes: pagemapBytes(stats.pages * PAGE_BYTES),
    };
  } else {
    await fsp.copyFile(memoryPath, path.join(work, "memory.bin"));
  }
  for (const f of [...(layer ? ["layer.bin", "pagemap.bin"] : ["memory.bin"]), "vmstate.bin"]) {
    const handle = await fsp.open(path.join(work, f), "r");
    await handle.sync();
    await handle.close();
    await fsp.chmod(path.join(work, f), 0o444);
  }
  const memStat = await fsp.stat(memoryPath);
  const manifest: SnapshotManifest = {
    schema: SNAPSHOT_SCHEMA,
    ...base,
    // Image files are named by build, not by path (see imageFiles): the record is relocatable.
    image: { ...base.image, kernel: "vmlinuz", initrd: "initrd.cpio", rootfs: "rootfs.ext4" },
    createdAt: new Date().toISOString(),
    sizes: { memoryBytes: memStat.size, memoryAllocatedBytes: memStat.blocks * 512, vmstateBytes: (await fsp.stat(vmstatePath)).size },
    memorySha256,
    ...(layer ? { layer } : {}),
  };
  await writeFileAtomic(path.join(work, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o444 });
  faultPoint("register.before-commit");
  try {
    await fsp.rename(work, tagDir(base.tag));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOTEMPTY" || (err as NodeJS.ErrnoException).code === "EEXIST") {
      throw new ForkdError("conflict", `snapshot ${base.tag} was created by someone else meanwhile`, { tag: base.tag });
    }
    throw err;
  }
  await fsyncDir(snapshotsDir());
  faultPoint("register.committed");
  // The RAM file is already on shmem (root's since the top): it becomes the staged image.
  // Hashed above by us: forks from this process need not hash it again.
  await rememberVerified(memoryPath, memorySha256);
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
  ensureStateDir();
  ensurePrivateDir(snapshotsDir(), { kind: "state dir (FORKD_HOME)" });
  ensureStagingDir();
  const temp = tempName();
  const work = path.join(snapshotsDir(), temp);
  const stageWork = path.join(shmDir(), "images", temp);
  await fsp.mkdir(work, { mode: 0o700 });
  await fsp.mkdir(stageWork, { mode: 0o700 });
  return { work, stageWork };
}

/** Temp names carry our pid so `forkd cleanup` can tell abandoned ones from ones in progress. */
function tempName(): string {
  return `.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
}

/** A fresh dot-dir on shmem for work that is never registered itself (a live capture's files); cleanup removes it once we are gone. */
export async function shmWorkDir(): Promise<string> {
  ensureStagingDir();
  const dir = path.join(shmDir(), "images", tempName());
  await fsp.mkdir(dir, { mode: 0o700 });
  return dir;
}
