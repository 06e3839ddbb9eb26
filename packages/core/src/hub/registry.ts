// Snapshots through OCI registries. A pushed snapshot chain is an OCI image
// manifest (artifactType application/vnd.forkd.snapshot.v1) whose config blob is
// the pack index and whose layers are the pack members, one blob each (the
// member's pack bytes, zstd-compressed, titled with its member path). Blobs are
// content-addressed, so a base shared by many snapshots is uploaded once, and a
// pull fetches only what this host lacks: image builds it has, snapshots it has
// under the same tag and memory, files of a local snapshot with the same memory.
// Nothing is registered until every file matched the index (registerReceived).
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { CompressStream, DecompressStream } from "zstd-napi";
import { imagesDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { fsyncDir, readJson, sha256File, writeFileAtomic } from "../common/fsutil.js";
import { validateName } from "../common/validate.js";
import { getSnapshot, listSnapshots, type SnapshotManifest, snapshotWorkDirs } from "../store/snapshots.js";
import { blobsDir, hubDir, removeDeadTemps, resumableDownload } from "./download.js";
import {
  checkRoom,
  MAX_INDEX_BYTES,
  memberBytes,
  type PackFile,
  type PackIndex,
  type PackMember,
  type Progress,
  packMembers,
  receiveMember,
  registerReceived,
  type UnpackResult,
  validateIndex,
} from "./pack.js";
import { parseRegistryRef, type RefOpts, type RegistryRef } from "./reference.js";
import { OCI_MANIFEST, RegistryClient } from "./registry-client.js";

const SNAPSHOT_ARTIFACT = "application/vnd.forkd.snapshot.v1";
const INDEX_MEDIA_TYPE = "application/vnd.forkd.pack.index.v1+json";
const MEMBER_MEDIA_TYPE = "application/vnd.forkd.pack.member.v1+zstd";
const TITLE = "org.opencontainers.image.title";
const ZSTD_LEVEL = 3;
const BLOB_DIGEST_RE = /^sha256:([0-9a-f]{64})$/;
/** Entries kept in the push cache (each is a member digest → blob digest, ~200 bytes). */
const MAX_CACHED_BLOBS = 4096;

type Descriptor = { mediaType: string; digest: string; size: number; annotations?: Record<string, string> };
export type SnapshotManifestOci = {
  schemaVersion: 2;
  mediaType: typeof OCI_MANIFEST;
  artifactType: typeof SNAPSHOT_ARTIFACT;
  config: Descriptor;
  layers: Descriptor[];
  annotations?: Record<string, string>;
};

export type PushResult = {
  ref: string;
  /** sha256:… of the manifest: pull REPO@DIGEST gets exactly this. */
  digest: string;
  snapshots: string[];
  blobs: number;
  blobs_uploaded: number;
  /** Blobs the registry already had (a shared base, an unchanged image). */
  blobs_present: number;
  uploaded_bytes: number;
  /** All blobs of the snapshot, compressed, as the registry holds them. */
  blob_bytes: number;
  /** The files they hold, as on disk. */
  logical_bytes: number;
  members_uploaded: string[];
};

export type PullResult = UnpackResult & {
  source: "registry" | "hub" | "url";
  ref: string;
  digest?: string;
  /** Bytes that crossed the network in this pull. */
  downloaded_bytes: number;
  /** What the source holds for the whole chain (every blob, or the pack file). */
  transfer_bytes: number;
  /** Registry pulls: members fetched, and members this host already had (not downloaded). */
  members_downloaded?: string[];
  members_local?: string[];
};

function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Fraction reporting in one unit (encoded bytes): compressing a member is half its weight, uploading the other half. */
function progressMeter(total: number, onProgress: Progress) {
  let done = 0;
  return {
    add(n: number, step: string) {
      done = Math.min(total, done + n);
      onProgress(Math.round(done), total, step);
    },
  };
}

/** Which compressed blob holds a member's bytes, by the member's content: pushes after the first skip compressing what the registry has. */
type BlobCache = Record<
  string,
  { digest: string; size: number /** HOST/REPO this host pushed it to: a source to mount from. */; repos?: string[] }
>;

function blobCachePath(): string {
  return path.join(hubDir(), "pushed-blobs.json");
}

async function loadBlobCache(): Promise<BlobCache> {
  const raw = await readJson<BlobCache>(blobCachePath()).catch(() => undefined);
  const out: BlobCache = {};
  for (const [key, value] of Object.entries(raw ?? {})) {
    if (!BLOB_DIGEST_RE.test(String(value?.digest)) || !Number.isSafeInteger(value?.size)) continue;
    const repos = Array.isArray(value.repos) ? value.repos.filter((r) => typeof r === "string").slice(-8) : [];
    out[key] = { digest: value.digest, size: value.size, repos };
  }
  return out;
}

function cacheKey(file: PackFile): string {
  return `${file.sha256}:${file.encoding}:${file.encoded_bytes}:zstd-${ZSTD_LEVEL}`;
}

/** Compress one member's pack bytes into `temp`; its digest and size. */
async function compressMember(m: PackMember, temp: string, onBytes: (n: number) => void): Promise<{ digest: string; size: number }> {
  const hash = createHash("sha256");
  let size = 0;
  const counted = async function* () {
    for await (const chunk of memberBytes(m)) {
      onBytes(chunk.length);
      yield chunk;
    }
  };
  await pipeline(
    Readable.from(counted()),
    new CompressStream({ compressionLevel: ZSTD_LEVEL }),
    async function* (source: AsyncIterable<Buffer>) {
      for await (const chunk of source) {
        hash.update(chunk);
        size += chunk.length;
        yield chunk;
      }
    },
    fs.createWriteStream(temp, { flags: "wx", mode: 0o600 }),
  );
  return { digest: `sha256:${hash.digest("hex")}`, size };
}

async function uploadFile(client: RegistryClient, file: string, digest: string, size: number, onBytes: (n: number) => void): Promise<void> {
  const handle = await fsp.open(file, "r");
  try {
    await client.uploadBlob(
      digest,
      size,
      async (offset, length) => {
        const buffer = Buffer.alloc(length);
        const { bytesRead } = await handle.read(buffer, 0, length, offset);
        if (bytesRead !== length) throw new ForkdError("io_error", `${file} shrank while it was being uploaded`);
        return buffer;
      },
      onBytes,
    );
  } finally {
    await handle.close();
  }
}

/** Does the target repository have the blob, or can it mount it from another repository of the same registry this host pushed it to? */
async function blobHere(client: RegistryClient, blob: BlobCache[string]): Promise<boolean> {
  if (await client.blobExists(blob.digest, blob.size)) return true;
  const prefix = `${client.ref.host}/`;
  for (const repo of blob.repos ?? []) {
    if (!repo.startsWith(prefix) || repo === `${prefix}${client.ref.repository}`) continue;
    if (await client.mountBlob(blob.digest, repo.slice(prefix.length)).catch(() => false)) return true;
  }
  return false;
}

/** Where a push goes, checked before anything is read or sent: a registry reference with a tag. */
export function pushTarget(tag: string, refArg: string, opts: RefOpts = {}): RegistryRef & { tag: string } {
  validateName(tag, "tag");
  const ref = parseRegistryRef(refArg, opts);
  if (!ref.tag) throw new ForkdError("bad_request", `push needs a tag to write (HOST/REPO:TAG), not a digest: ${ref.display}`);
  return ref as RegistryRef & { tag: string };
}

/** Push `tag` and its chain (image build, ancestors) to REGISTRY/REPO:TAG. */
export async function pushSnapshot(tag: string, refArg: string, opts: RefOpts & { onProgress?: Progress } = {}): Promise<PushResult> {
  const ref = pushTarget(tag, refArg, opts);
  const { index, members } = await packMembers(tag);
  const client = new RegistryClient(ref, { ...opts, push: true });
  await client.ping();
  blobsDir();
  // Push dirs of processes that died (kill -9 of a push) go with the next push.
  await removeDeadTemps(hubDir(), /^push-(\d+)-[0-9a-f]+$/);
  const temp = path.join(hubDir(), `push-${process.pid}-${randomBytes(4).toString("hex")}`);
  await fsp.mkdir(temp, { mode: 0o700 });
  const cache = await loadBlobCache();
  const logical = index.files.reduce((sum, f) => sum + f.size, 0);
  const total = members.reduce((sum, m) => sum + m.file.encoded_bytes, 0);
  const meter = progressMeter(total, opts.onProgress ?? (() => {}));
  const result: PushResult = {
    ref: ref.display,
    digest: "",
    snapshots: index.snapshots,
    blobs: members.length + 1,
    blobs_uploaded: 0,
    blobs_present: 0,
    uploaded_bytes: 0,
    blob_bytes: 0,
    logical_bytes: logical,
    members_uploaded: [],
  };
  try {
    const layers: Descriptor[] = [];
    for (const m of members) {
      const weight = m.file.encoded_bytes;
      const key = cacheKey(m.file);
      let blob = cache[key];
      if (blob && (await blobHere(client, blob))) {
        result.blobs_present++;
        meter.add(weight, `present ${m.file.path}`);
      } else {
        const file = path.join(temp, "blob");
        blob = await compressMember(m, file, (n) => meter.add(n / 2, `compressing ${m.file.path}`));
        cache[key] = { ...blob, repos: cache[key]?.digest === blob.digest ? (cache[key]?.repos ?? []) : [] };
        if (await blobHere(client, cache[key]!)) {
          result.blobs_present++;
          meter.add(weight / 2, `present ${m.file.path}`);
        } else {
          const size = blob.size;
          await uploadFile(client, file, blob.digest, size, (n) =>
            meter.add(((n / Math.max(size, 1)) * weight) / 2, `uploading ${m.file.path}`),
          );
          result.blobs_uploaded++;
          result.uploaded_bytes += size;
          result.members_uploaded.push(m.file.path);
        }
        await fsp.rm(file, { force: true });
      }
      const entry = cache[key]!;
      const here = `${ref.host}/${ref.repository}`;
      entry.repos = [...(entry.repos ?? []).filter((r) => r !== here), here].slice(-8);
      // Most recently used last: the oldest are the ones dropped when the cache is trimmed.
      delete cache[key];
      cache[key] = entry;
      result.blob_bytes += blob.size;
      layers.push({ mediaType: MEMBER_MEDIA_TYPE, digest: blob.digest, size: blob.size, annotations: { [TITLE]: m.file.path } });
    }
    const indexBytes = Buffer.from(`${JSON.stringify(index, null, 2)}\n`);
    const config: Descriptor = { mediaType: INDEX_MEDIA_TYPE, digest: `sha256:${sha256(indexBytes)}`, size: indexBytes.length };
    if (await client.blobExists(config.digest, config.size)) result.blobs_present++;
    else {
      await client.uploadBlob(config.digest, config.size, async (offset, length) => indexBytes.subarray(offset, offset + length));
      result.blobs_uploaded++;
      result.uploaded_bytes += config.size;
    }
    result.blob_bytes += config.size;
    const manifest: SnapshotManifestOci = {
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      artifactType: SNAPSHOT_ARTIFACT,
      config,
      layers,
      annotations: { "org.opencontainers.image.created": index.created_at, "org.forkd.snapshot.head": index.head },
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifest));
    result.digest = `sha256:${sha256(manifestBytes)}`;
    opts.onProgress?.(total, total, "writing the manifest");
    await client.putManifest(ref.tag, manifestBytes, OCI_MANIFEST);
    const keep = Object.entries(cache).slice(-MAX_CACHED_BLOBS);
    await writeFileAtomic(blobCachePath(), `${JSON.stringify(Object.fromEntries(keep))}\n`, { mode: 0o600 });
    return result;
  } finally {
    await fsp.rm(temp, { recursive: true, force: true });
  }
}

function notForkd(ref: RegistryRef, why: string): ForkdError {
  return new ForkdError("bad_request", `${ref.display} is not a forkd snapshot: ${why}; nothing was registered`, { ref: ref.display });
}

/**
 * A pack's members: each snapshot's manifest, memory or layer, pagemap and device
 * state, and its image's three files. A 64-deep chain is a few hundred; a manifest
 * naming more is not a forkd snapshot, and is refused before anything is fetched.
 */
const MAX_PACK_MEMBERS = 4096;

/** The manifest's shape, checked before anything it names is fetched. */
export function validateOciManifest(ref: RegistryRef, value: unknown): SnapshotManifestOci {
  const m = value as SnapshotManifestOci;
  if (!m || typeof m !== "object" || m.schemaVersion !== 2)
    throw notForkd(ref, "its manifest is not an OCI image manifest (schemaVersion 2)");
  if (m.mediaType !== undefined && m.mediaType !== OCI_MANIFEST)
    throw notForkd(ref, `its manifest is a ${String(m.mediaType).slice(0, 100)}`);
  if (m.config?.mediaType !== INDEX_MEDIA_TYPE) {
    throw notForkd(
      ref,
      `its config is ${String(m.config?.mediaType).slice(0, 100)}, not ${INDEX_MEDIA_TYPE} (an ordinary container image?)`,
    );
  }
  const descriptors = [m.config, ...(Array.isArray(m.layers) ? m.layers : [])];
  if (!Array.isArray(m.layers) || m.layers.length === 0) throw notForkd(ref, "its manifest has no layers");
  if (m.layers.length > MAX_PACK_MEMBERS) throw notForkd(ref, `its manifest names ${m.layers.length} layers (at most ${MAX_PACK_MEMBERS})`);
  for (const d of descriptors) {
    if (!BLOB_DIGEST_RE.test(String(d?.digest)))
      throw notForkd(ref, `a blob digest '${String(d?.digest).slice(0, 80)}' is not sha256:<hex>`);
    if (!Number.isSafeInteger(d.size) || d.size < 0) throw notForkd(ref, `blob ${d.digest} declares ${String(d.size)} bytes`);
  }
  for (const l of m.layers) {
    if (l.mediaType !== MEMBER_MEDIA_TYPE) throw notForkd(ref, `a layer is ${String(l.mediaType).slice(0, 100)}, not ${MEMBER_MEDIA_TYPE}`);
    if (typeof l.annotations?.[TITLE] !== "string") throw notForkd(ref, `layer ${l.digest} has no ${TITLE}`);
  }
  if (m.config.size > MAX_INDEX_BYTES) throw notForkd(ref, `its index is ${m.config.size} bytes (at most ${MAX_INDEX_BYTES})`);
  return m;
}

/** zstd never grows data by more than this (ZSTD_compressBound, with room). */
function compressedBound(n: number): number {
  return n + Math.ceil(n / 128) + 64 * 1024;
}

/** Decode one verified blob into `work` as its member, checked against the index. */
async function receiveBlob(work: string, file: PackFile, blob: string): Promise<void> {
  await pipeline(fs.createReadStream(blob), new DecompressStream(), async (source: AsyncIterable<Buffer>) => {
    await receiveMember(work, file, source);
  }).catch((err: Error) => {
    if (err instanceof ForkdError) throw err;
    throw new ForkdError(
      "bad_request",
      `not a usable forkd snapshot: ${file.path} does not decompress (${err.message}); nothing was registered`,
    );
  });
}

/** The tag registerReceived will reuse for snapshot `t`, if this host already has it with the same memory. */
async function reusedTag(t: string, m: SnapshotManifest, finalTag: string): Promise<string | undefined> {
  const here = await getSnapshot(finalTag).catch(() => undefined);
  if (here?.memorySha256 === m.memorySha256) return finalTag;
  if (!here) return undefined;
  const alt = `${t.slice(0, 47)}-${m.memorySha256.slice(0, 16)}`;
  const again = await getSnapshot(alt).catch(() => undefined);
  return again?.memorySha256 === m.memorySha256 ? alt : undefined;
}

/** Copy a member from a local snapshot with the same memory, when its bytes hash to the index's sha256. */
async function copyFromLocal(work: string, file: PackFile, dirs: string[]): Promise<boolean> {
  const name = path.basename(file.path);
  for (const dir of dirs) {
    const source = path.join(dir, name);
    const st = await fsp.stat(source).catch(() => undefined);
    if (!st?.isFile() || st.size !== file.size) continue;
    if ((await sha256File(source)) !== file.sha256) continue;
    const target = path.join(work, ...file.path.split("/"));
    await fsp.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
    await fsp.copyFile(source, target, fs.constants.COPYFILE_EXCL | fs.constants.COPYFILE_FICLONE);
    await fsp.chmod(target, 0o600);
    // The copy is what gets registered: it must be the bytes the index names.
    if ((await sha256File(target)) !== file.sha256) {
      await fsp.rm(target, { force: true });
      continue;
    }
    return true;
  }
  return false;
}

/** Pull REGISTRY/REPO:TAG (or @sha256:…): verify everything, fetch only what is missing here, then register. */
export async function pullFromRegistry(
  ref: RegistryRef,
  opts: RefOpts & { tag?: string; onProgress?: Progress } = {},
): Promise<PullResult> {
  if (opts.tag !== undefined) validateName(opts.tag, "tag");
  const onProgress = opts.onProgress ?? (() => {});
  const client = new RegistryClient(ref, opts);
  onProgress(0, 0, "reading the manifest");
  const { bytes: manifestBytes } = await client.getManifest();
  const digest = `sha256:${sha256(manifestBytes)}`;
  if (ref.digest && ref.digest !== digest) {
    throw new ForkdError(
      "integrity_failed",
      `the manifest ${ref.host} sent for ${ref.display} hashes to ${digest}; refused, nothing was registered`,
    );
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(manifestBytes.toString("utf8"));
  } catch {
    throw notForkd(ref, "its manifest is not JSON");
  }
  const manifest = validateOciManifest(ref, parsed);
  let downloaded = manifestBytes.length;
  const indexBytes = await client.getSmallBlob(manifest.config.digest, MAX_INDEX_BYTES);
  downloaded += indexBytes.length;
  if (`sha256:${sha256(indexBytes)}` !== manifest.config.digest) {
    throw new ForkdError(
      "integrity_failed",
      `the index blob ${manifest.config.digest} of ${ref.display} does not match its digest (damaged or tampered with); refused, nothing was registered`,
    );
  }
  let index: PackIndex;
  try {
    index = validateIndex(JSON.parse(indexBytes.toString("utf8")));
  } catch (err) {
    throw err instanceof ForkdError ? err : notForkd(ref, "its index is not JSON");
  }
  const layerFor = new Map<string, Descriptor>();
  for (const l of manifest.layers) {
    const title = l.annotations![TITLE]!;
    const file = index.files.find((f) => f.path === title);
    if (!file) throw notForkd(ref, `layer ${l.digest} is titled '${title.slice(0, 120)}', which its index does not name`);
    if (layerFor.has(title)) throw notForkd(ref, `two layers hold ${title}`);
    if (l.size > compressedBound(file.encoded_bytes))
      throw notForkd(ref, `layer ${title} is ${l.size} bytes, more than ${file.path} can compress to`);
    layerFor.set(title, l);
  }
  const missingLayer = index.files.find((f) => !layerFor.has(f.path));
  if (missingLayer) throw notForkd(ref, `no layer holds ${missingLayer.path}`);
  const transfer = manifest.config.size + manifest.layers.reduce((sum, l) => sum + l.size, 0);
  const result = { members_downloaded: [] as string[], members_local: [] as string[] };
  const blobFiles = new Set<string>();
  const dir = blobsDir();
  let done = 0;
  let total = 0;
  const fetchMember = async (work: string, file: PackFile) => {
    const layer = layerFor.get(file.path)!;
    const hex = layer.digest.slice("sha256:".length);
    const shared = path.join(dir, `sha256-${hex}`);
    const got = await resumableDownload({
      target: shared,
      keepAt: path.join(work, ".blobs", `sha256-${hex}`),
      expect: { size: layer.size, sha256: hex },
      what: `blob ${layer.digest} (${file.path}) of ${ref.host}/${ref.repository}`,
      open: (from, signal) => client.openBlob(layer.digest, from, signal),
      onBytes: (n) => {
        done += n;
        onProgress(done, Math.max(total, done), `downloading ${file.path}`);
      },
    });
    blobFiles.add(shared);
    downloaded += got.downloaded;
    await receiveBlob(work, file, got.file).catch(async (err: unknown) => {
      // Its digest matched, yet its content is not what the index says: it is no use to a retry either.
      await fsp.rm(shared, { force: true });
      throw err;
    });
    await fsp.rm(got.file, { force: true });
    result.members_downloaded.push(file.path);
  };

  const { work, stageWork } = await snapshotWorkDirs();
  await fsp.rm(stageWork, { recursive: true, force: true });
  try {
    await checkRoom(index);
    // Manifests first: they say which snapshots (by memory digest) this host already has.
    const manifests = new Map<string, SnapshotManifest>();
    for (const t of index.snapshots) {
      await fetchMember(work, index.files.find((f) => f.path === `snapshots/${t}/manifest.json`)!);
      const m = await readJson<SnapshotManifest>(path.join(work, "snapshots", t, "manifest.json")).catch(() => undefined);
      if (!m || m.tag !== t || typeof m.memorySha256 !== "string") throw notForkd(ref, `snapshot ${t} has no valid manifest`);
      manifests.set(t, m);
    }
    const head = index.head;
    const finalHead = opts.tag ?? head;
    const existingHead = await getSnapshot(finalHead).catch(() => undefined);
    if (existingHead && existingHead.memorySha256 !== manifests.get(head)!.memorySha256) {
      throw new ForkdError("conflict", `snapshot ${finalHead} already exists with other contents; pick another name with --tag`, {
        tag: finalHead,
      });
    }
    const skip = new Set<string>();
    const localDirs = new Map<string, string[]>();
    const local = await listSnapshots();
    for (const t of index.snapshots) {
      const m = manifests.get(t)!;
      const owned = index.files.filter((f) => f.path.startsWith(`snapshots/${t}/`) && !f.path.endsWith("/manifest.json"));
      if (await reusedTag(t, m, t === head ? finalHead : t)) {
        for (const f of owned) skip.add(f.path);
      } else {
        localDirs.set(
          t,
          local.filter((s) => s.memorySha256 === m.memorySha256).map((s) => s.dir),
        );
      }
    }
    for (const image of index.images) {
      if (fs.existsSync(path.join(imagesDir(), image.name, image.digest, "image.json"))) {
        for (const f of index.files) if (f.path.startsWith(`images/${image.name}/${image.digest}/`)) skip.add(f.path);
      }
    }
    const todo = index.files.filter((f) => !f.path.endsWith("/manifest.json") || !f.path.startsWith("snapshots/"));
    for (const f of todo) {
      if (skip.has(f.path)) result.members_local.push(f.path);
    }
    total = done + todo.filter((f) => !skip.has(f.path)).reduce((sum, f) => sum + layerFor.get(f.path)!.size, 0);
    for (const f of todo) {
      if (skip.has(f.path)) continue;
      const tag = /^snapshots\/([^/]+)\//.exec(f.path)?.[1];
      if (tag && (await copyFromLocal(work, f, localDirs.get(tag) ?? []))) {
        result.members_local.push(f.path);
        total -= layerFor.get(f.path)!.size;
        continue;
      }
      await fetchMember(work, f);
    }
    onProgress(total, total, "registering");
    const registered = await registerReceived(work, index, opts.tag);
    for (const file of blobFiles) await fsp.rm(file, { force: true });
    await fsyncDir(dir);
    return {
      ...registered,
      source: "registry",
      ref: ref.display,
      digest,
      downloaded_bytes: downloaded,
      transfer_bytes: transfer,
      ...result,
    };
  } finally {
    await fsp.rm(work, { recursive: true, force: true });
  }
}
