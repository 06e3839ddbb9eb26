// Staged memory images: the shmem copies of snapshot memory that children map.
// A child's RAM is whatever bytes that file holds, so the file is checked against
// the digest recorded at registration before children map it: hashed when it is
// staged or first used by this process, and checked cheaply (owner, mode, size,
// inode, mtime, ctime) on every later use, re-hashed when any of those changed.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir, stageBudgetBytes } from "../common/config.js";
import { ensureStagingDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { sha256File } from "../common/fsutil.js";
import { isAlive } from "../common/pid.js";
import { keepFromVmms } from "../vmm/process.js";
import { sealedStagedImage } from "./sealed-images.js";
import { type StagedRow, sandboxes, staged } from "./state.js";

/** What staging needs to know of a snapshot. */
export type StageableSnapshot = { tag: string; memorySha256: string };

/** What verifying a staged image needs: the durable copy and what registration recorded. */
export type VerifiableSnapshot = StageableSnapshot & {
  memoryPath: string;
  sizes: { memoryBytes: number };
  /**
   * Writes the whole memory image to the given file, for a snapshot whose durable
   * copy is a diff layer (its parent's image plus its pages); absent: copy memoryPath.
   */
  assemble?: (target: string) => Promise<void>;
};

export function stageKey(manifest: StageableSnapshot): string {
  return `${manifest.tag}@${manifest.memorySha256.slice(0, 16)}`;
}

export function stagedPath(manifest: StageableSnapshot): string {
  return path.join(shmDir(), "images", stageKey(manifest), "memory.bin");
}

/**
 * Files this process hashed, by device and inode, with what they looked like then.
 * A write(2) changes mtime and ctime (and ctime cannot be set back), a replacement
 * changes the inode, so a file whose identity still matches holds the bytes hashed.
 */
const verified = new Map<string, { identity: string; sha256: string }>();

function identityOf(st: fs.BigIntStats): { key: string; identity: string } {
  return { key: `${st.dev}:${st.ino}`, identity: `${st.size}:${st.mtimeNs}:${st.ctimeNs}:${st.mode}:${st.uid}` };
}

/** Record that `file`, as it is now, hashes to `sha256` (the caller just hashed it). */
export async function rememberVerified(file: string, sha256: string): Promise<void> {
  const { key, identity } = identityOf(await fsp.lstat(file, { bigint: true }));
  verified.set(key, { identity, sha256 });
}

type StagedCheck = { ok: true } | { ok: false; missing: boolean; why: string };

/** Is the staged file there, ours, read-only, the recorded size and (hashed once) the recorded digest? */
async function checkStaged(file: string, snapshot: VerifiableSnapshot): Promise<StagedCheck> {
  let st: fs.BigIntStats;
  try {
    st = await fsp.lstat(file, { bigint: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return { ok: false, missing: true, why: "not staged" };
    throw err;
  }
  const euid = BigInt(process.geteuid?.() ?? 0);
  if (!st.isFile()) return { ok: false, missing: false, why: "is not a regular file" };
  if (st.uid !== euid) return { ok: false, missing: false, why: `is owned by uid ${st.uid}` };
  // Children map a sealed memfd copy (sealed-images.ts), never this file: nobody but
  // forkd has any business reading it, and nobody, forkd included, writes it.
  if ((st.mode & 0o277n) !== 0n) {
    return { ok: false, missing: false, why: `is writable or open to others (mode ${(st.mode & 0o7777n).toString(8)})` };
  }
  if (st.size !== BigInt(snapshot.sizes.memoryBytes)) {
    return { ok: false, missing: false, why: `is ${st.size} bytes, not the ${snapshot.sizes.memoryBytes} recorded` };
  }
  const { key, identity } = identityOf(st);
  const known = verified.get(key);
  if (known?.identity === identity && known.sha256 === snapshot.memorySha256) return { ok: true };
  const sha256 = await sha256File(file);
  // Hashing takes a while: a file that changed meanwhile proves nothing.
  const after = identityOf(await fsp.lstat(file, { bigint: true }));
  if (after.key !== key || after.identity !== identity) return { ok: false, missing: false, why: "changed while it was hashed" };
  if (sha256 !== snapshot.memorySha256) return { ok: false, missing: false, why: `has sha256 ${sha256.slice(0, 16)}…` };
  verified.set(key, { identity, sha256 });
  return { ok: true };
}

/** A fresh staged copy from the durable store, refused unless it hashes to the recorded digest. */
async function stageFromStore(snapshot: VerifiableSnapshot, target: string): Promise<void> {
  const durable = snapshot.assemble ? undefined : await fsp.stat(snapshot.memoryPath).catch(() => undefined);
  if (!snapshot.assemble && durable?.size !== snapshot.sizes.memoryBytes) {
    throw integrityError(snapshot, durable ? `is ${durable.size} bytes, not the ${snapshot.sizes.memoryBytes} recorded` : "is missing");
  }
  const dir = path.dirname(target);
  const temp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
  await fsp.mkdir(temp, { mode: 0o700 });
  try {
    const copy = path.join(temp, "memory.bin");
    if (snapshot.assemble) await snapshot.assemble(copy);
    else await fsp.copyFile(snapshot.memoryPath, copy, fs.constants.COPYFILE_FICLONE);
    keepFromVmms(copy);
    // Hashing the copy checks the durable bytes and the copy at once: what children map is what was hashed.
    const sha256 = await sha256File(copy);
    if (sha256 !== snapshot.memorySha256) throw integrityError(snapshot, `has sha256 ${sha256.slice(0, 16)}…`);
    await rememberVerified(copy, sha256);
    await fsp.rename(temp, dir).catch(async (err: NodeJS.ErrnoException) => {
      // Someone else staged it meanwhile: theirs is checked like any other.
      if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
    });
  } finally {
    await fsp.rm(temp, { recursive: true, force: true });
  }
}

function integrityError(snapshot: VerifiableSnapshot, why: string): ForkdError {
  return new ForkdError(
    "integrity_failed",
    `the memory image of snapshot ${snapshot.tag} in the durable store (${snapshot.memoryPath}) ${why}, but registration recorded ` +
      `${snapshot.sizes.memoryBytes} bytes with sha256 ${snapshot.memorySha256.slice(0, 16)}…: it was damaged or tampered with; ` +
      `remove the snapshot (forkd rmi ${snapshot.tag}) and create it again`,
    { tag: snapshot.tag, path: snapshot.memoryPath },
  );
}

/**
 * The shmem copy of a snapshot's memory image that children map, verified. Staged
 * on first use by a kernel-side copy from the durable store, then kept within the
 * budget; a staged copy that fails its check is replaced from the durable store.
 */
export async function ensureStaged(snapshot: VerifiableSnapshot): Promise<string> {
  ensureStagingDir();
  const target = stagedPath(snapshot);
  const key = stageKey(snapshot);
  let check = await checkStaged(target, snapshot);
  // Twice: a copy someone else staged at the same moment is checked before it is used.
  for (let attempt = 0; !check.ok && attempt < 2; attempt++) {
    // A damaged or tampered staged copy is replaced, not repaired: the durable copy is the reference.
    if (!check.missing) await fsp.rm(path.dirname(target), { recursive: true, force: true });
    await stageFromStore(snapshot, target);
    check = await checkStaged(target, snapshot);
  }
  if (!check.ok) {
    throw new ForkdError(
      "integrity_failed",
      `the staged memory image ${target} of snapshot ${snapshot.tag} ${check.why} even after staging it again`,
      {
        tag: snapshot.tag,
        path: target,
      },
    );
  }
  const stat = await fsp.stat(target);
  staged.upsert({ key, tag: snapshot.tag, path: target, bytes: stat.blocks * 512, last_used_ms: Date.now() });
  await enforceStageBudget(key);
  return target;
}

/**
 * What children map for a staged image: its sealed memfd copy (the path the root
 * launcher opens). The file was verified by ensureStaged in this process, so its
 * digest is known by identity; one staged elsewhere is hashed here first.
 */
export async function sealedSource(stagedFile: string): Promise<string> {
  const { key, identity } = identityOf(await fsp.lstat(stagedFile, { bigint: true }));
  const known = verified.get(key);
  const sha256 = known?.identity === identity ? known.sha256 : await sha256File(stagedFile);
  return sealedStagedImage(stagedFile, sha256);
}

/**
 * Staged images that work in progress still needs (a fork whose children have not
 * all mapped theirs yet): never evicted while held. Held before staging starts, so
 * there is no moment between staged and held for an eviction to slip into.
 */
const holds = new Map<string, number>();

export function holdStaged(key: string): () => void {
  holds.set(key, (holds.get(key) ?? 0) + 1);
  let held = true;
  return () => {
    if (!held) return;
    held = false;
    const left = (holds.get(key) ?? 1) - 1;
    if (left > 0) holds.set(key, left);
    else holds.delete(key);
  };
}

/** A staged image nothing uses: no live child maps it, no work holds it, and it is not `keep`. Checked again right before each removal. */
function idle(row: StagedRow, keep?: string): boolean {
  if (row.key === keep || holds.has(row.key)) return false;
  return !sandboxes.byTag(row.tag).some((s) => isAlive(s.pid));
}

/** Bytes of staged images that could be evicted now. */
export function evictableStagedBytes(): number {
  return staged
    .list()
    .filter((row) => idle(row))
    .reduce((sum, row) => sum + row.bytes, 0);
}

/**
 * Bytes on the staging filesystem that work in progress has written and no staged
 * row counts yet: snapshot and BRANCH dot-dirs (parent RAM, capture streams, new
 * memory images) and copies being staged. They take room on shmem all the same.
 */
export async function inProgressStageBytes(): Promise<number> {
  const imagesDir = path.join(shmDir(), "images");
  const known = new Set(staged.list().map((row) => path.dirname(row.path)));
  let entries: string[];
  try {
    entries = await fsp.readdir(imagesDir);
  } catch {
    return 0;
  }
  let total = 0;
  for (const name of entries) {
    const dir = path.join(imagesDir, name);
    if (known.has(dir)) continue;
    const files = await fsp.readdir(dir).catch(() => [] as string[]);
    for (const file of files)
      total += await fsp.lstat(path.join(dir, file)).then(
        (st) => st.blocks * 512,
        () => 0,
      );
  }
  return total;
}

async function evict(row: StagedRow): Promise<void> {
  await fsp.rm(path.dirname(row.path), { recursive: true, force: true });
  staged.remove(row.key);
}

/**
 * Evict least recently used staged images beyond the budget, never one with live
 * children, one held by work in progress, or the one just used. Work in progress
 * on shmem counts against the budget too: it will be a staged image soon.
 */
export async function enforceStageBudget(keep: string): Promise<void> {
  const rows = staged.list();
  let total = rows.reduce((sum, r) => sum + r.bytes, 0) + (await inProgressStageBytes());
  const budget = stageBudgetBytes();
  for (const row of rows) {
    if (total <= budget) break;
    if (!idle(row, keep)) continue;
    await evict(row);
    total -= row.bytes;
  }
}

/** Evict idle staged images, least recently used first, until `bytes` are freed or none is left; the bytes freed. */
export async function evictStaged(bytes: number): Promise<number> {
  let freed = 0;
  for (const row of staged.list()) {
    if (freed >= bytes) break;
    if (!idle(row)) continue;
    await evict(row);
    freed += row.bytes;
  }
  return freed;
}
