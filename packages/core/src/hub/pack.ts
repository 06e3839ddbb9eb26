// Packs: one self-contained `.forkd.tar.zst` per snapshot chain — kernel, initrd,
// root image, every ancestor layer, their manifests — with an index first that
// names every file's size and sha256. Unpacking trusts nothing in the archive: it
// checks each member against the index while it streams to a temp dir, and only
// when everything matched are images and snapshots moved into the store, bases
// before the layers on them, each with one rename.
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import tar from "tar-stream";
import { CompressStream, DecompressStream } from "zstd-napi";
import { imagesDir, snapshotsDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { fsyncDir, readJson, sha256File, writeFileAtomic } from "../common/fsutil.js";
import { NAME_RE, validateName } from "../common/validate.js";
import { imageFiles } from "../guest/image.js";
import { ancestorsOf } from "../store/chains.js";
import { getSnapshot, type SnapshotInfo, type SnapshotManifest, snapshotWorkDirs, tagDir } from "../store/snapshots.js";
import { encodeSparse, planSparse, SparseDecoder, type SparsePlan } from "./sparse.js";

const PACK_FORMAT = "forkd-pack";
const PACK_VERSION = 1;
const INDEX_NAME = "forkd-pack.json";
export const MAX_INDEX_BYTES = 1 << 20;
/** Larger than any guest memory forkd makes (64 GiB) or a root image it builds. */
const MAX_FILE_BYTES = 80 * 2 ** 30;

export type PackFile = { path: string; size: number; sha256: string; encoding: "raw" | "sparse"; encoded_bytes: number };
export type PackIndex = {
  format: typeof PACK_FORMAT;
  version: number;
  created_at: string;
  head: string;
  /** Oldest first: each snapshot's parent comes before it. */
  snapshots: string[];
  images: { name: string; digest: string }[];
  files: PackFile[];
};

export type Progress = (done: number, total: number, what: string) => void;

type Member = { file: PackFile; source: string; sparse?: SparsePlan };
/** One file of a pack, with where its bytes come from. */
export type PackMember = Member;

const DIGEST_RE = /^[0-9a-f]{64}$/;
/** The only member names a pack may hold. */
const MEMBER_RE = new RegExp(
  `^(?:images/(${NAME_RE.source.slice(1, -1)})/([0-9a-f]{64})/(image\\.json|vmlinuz|initrd\\.cpio|rootfs\\.ext4)|snapshots/(${NAME_RE.source.slice(1, -1)})/(manifest\\.json|vmstate\\.bin|memory\\.bin|layer\\.bin|pagemap\\.bin))$`,
);
const SPARSE_NAMES = new Set(["rootfs.ext4", "memory.bin", "layer.bin"]);

async function member(packPath: string, source: string): Promise<Member> {
  if (SPARSE_NAMES.has(path.basename(packPath))) {
    const plan = await planSparse(source);
    return {
      file: { path: packPath, size: plan.size, sha256: plan.sha256, encoding: "sparse", encoded_bytes: plan.encodedBytes },
      source,
      sparse: plan,
    };
  }
  const size = (await fsp.stat(source)).size;
  return { file: { path: packPath, size, sha256: await sha256File(source), encoding: "raw", encoded_bytes: size }, source };
}

/** What a pack of `tag` holds: the chain's snapshots (oldest first) and the image builds they use. */
export async function packMembers(tag: string): Promise<{ index: PackIndex; members: Member[] }> {
  const head = await getSnapshot(tag);
  const chain = [...(await ancestorsOf(head)), head];
  const images = new Map<string, { name: string; digest: string }>();
  for (const s of chain) images.set(`${s.image.name}/${s.image.digest}`, { name: s.image.name, digest: s.image.digest });
  const members: Member[] = [];
  for (const image of images.values()) {
    const files = imageFiles(image.name, image.digest);
    const base = `images/${image.name}/${image.digest}`;
    members.push(await member(`${base}/image.json`, path.join(files.dir, "image.json")));
    for (const [name, source] of [
      ["vmlinuz", files.kernel],
      ["initrd.cpio", files.initrd],
      ["rootfs.ext4", files.rootfs],
    ] as const) {
      members.push(await member(`${base}/${name}`, source));
    }
  }
  for (const s of chain) members.push(...(await snapshotMembers(s)));
  const index: PackIndex = {
    format: PACK_FORMAT,
    version: PACK_VERSION,
    created_at: new Date().toISOString(),
    head: tag,
    snapshots: chain.map((s) => s.tag),
    images: [...images.values()],
    files: members.map((m) => m.file),
  };
  return { index, members };
}

/** A snapshot's own files, as a pack or a registry names them. */
async function snapshotMembers(s: SnapshotInfo): Promise<Member[]> {
  const base = `snapshots/${s.tag}`;
  const out = [
    await member(`${base}/manifest.json`, path.join(s.dir, "manifest.json")),
    await member(`${base}/vmstate.bin`, s.vmstatePath),
  ];
  if (s.layer) {
    out.push(await member(`${base}/layer.bin`, s.layerPath), await member(`${base}/pagemap.bin`, s.pagemapPath));
  } else {
    out.push(await member(`${base}/memory.bin`, s.memoryPath));
  }
  return out;
}

/** The bytes of one member as a pack or a blob carries them. */
export async function* memberBytes(m: Member): AsyncGenerator<Buffer> {
  if (m.sparse) {
    yield* encodeSparse(m.sparse);
    return;
  }
  for await (const chunk of fs.createReadStream(m.source, { highWaterMark: 1 << 20 })) yield chunk as Buffer;
}

/** Write `tag` and everything it needs into one zstd-compressed tar at `out` (temp, fsync, rename). */
export async function packSnapshot(tag: string, out: string, onProgress: Progress = () => {}): Promise<PackIndex & { pack_bytes: number }> {
  const { index, members } = await packMembers(tag);
  const total = members.reduce((sum, m) => sum + m.file.encoded_bytes, 0);
  const temp = path.join(path.dirname(path.resolve(out)), `.${path.basename(out)}.${randomBytes(4).toString("hex")}.tmp`);
  const pack = tar.pack();
  const written = pipeline(pack, new CompressStream(), fs.createWriteStream(temp, { flags: "wx", mode: 0o644 }));
  let done = 0;
  try {
    const indexBytes = Buffer.from(`${JSON.stringify(index, null, 2)}\n`);
    pack.entry({ name: INDEX_NAME, size: indexBytes.length, mode: 0o644 }, indexBytes);
    for (const m of members) {
      await new Promise<void>((resolve, reject) => {
        const entry = pack.entry({ name: m.file.path, size: m.file.encoded_bytes, mode: 0o644 }, (err) => (err ? reject(err) : resolve()));
        (async () => {
          for await (const chunk of memberBytes(m)) {
            if (!entry.write(chunk)) await new Promise<void>((r) => entry.once("drain", () => r()));
            done += chunk.length;
            onProgress(done, total, m.file.path);
          }
          entry.end(undefined);
        })().catch(reject);
      });
    }
    pack.finalize();
    await written;
    const handle = await fsp.open(temp, "r");
    await handle.sync();
    await handle.close();
    await fsp.rename(temp, out);
    await fsyncDir(path.dirname(path.resolve(out)));
    return { ...index, pack_bytes: (await fsp.stat(out)).size };
  } catch (err) {
    pack.destroy();
    await written.catch(() => {});
    await fsp.rm(temp, { force: true });
    throw err;
  }
}

function badPack(why: string): ForkdError {
  return new ForkdError("bad_request", `not a usable forkd pack: ${why}; nothing was registered`);
}

/** Check an index read from an untrusted pack or registry before anything is written. */
export function validateIndex(value: unknown): PackIndex {
  const index = value as PackIndex;
  if (!index || typeof index !== "object" || index.format !== PACK_FORMAT) throw badPack(`its index is not a ${PACK_FORMAT} index`);
  if (index.version !== PACK_VERSION) throw badPack(`format version ${String(index.version)} (this forkd reads version ${PACK_VERSION})`);
  if (!Array.isArray(index.snapshots) || index.snapshots.length === 0 || !Array.isArray(index.files) || !Array.isArray(index.images)) {
    throw badPack("its index lacks snapshots, images or files");
  }
  for (const t of index.snapshots) validateName(t, "tag");
  if (index.head !== index.snapshots.at(-1)) throw badPack("its head is not the last snapshot of its chain");
  for (const image of index.images) {
    validateName(image?.name, "image name");
    if (!DIGEST_RE.test(String(image?.digest))) throw badPack(`image digest '${String(image?.digest).slice(0, 80)}' is not a sha256`);
  }
  const seen = new Set<string>();
  for (const f of index.files) {
    if (typeof f?.path !== "string" || !MEMBER_RE.test(f.path))
      throw badPack(`it names a member '${String(f?.path).slice(0, 120)}' forkd never writes`);
    if (seen.has(f.path)) throw badPack(`it names ${f.path} twice`);
    seen.add(f.path);
    if (!Number.isSafeInteger(f.size) || f.size < 0 || f.size > MAX_FILE_BYTES) throw badPack(`${f.path} declares ${String(f.size)} bytes`);
    if (!Number.isSafeInteger(f.encoded_bytes) || f.encoded_bytes < 0 || f.encoded_bytes > MAX_FILE_BYTES) {
      throw badPack(`${f.path} declares ${String(f.encoded_bytes)} encoded bytes`);
    }
    if (!DIGEST_RE.test(String(f.sha256))) throw badPack(`${f.path} has no sha256`);
    if (f.encoding !== "raw" && f.encoding !== "sparse") throw badPack(`${f.path} has encoding ${String(f.encoding)}`);
    if (f.encoding === "raw" && f.encoded_bytes !== f.size) throw badPack(`${f.path} is raw but its sizes differ`);
  }
  for (const t of index.snapshots) {
    for (const name of ["manifest.json", "vmstate.bin"]) {
      if (!seen.has(`snapshots/${t}/${name}`)) throw badPack(`snapshot ${t} has no ${name}`);
    }
  }
  return index;
}

/**
 * Receive one member into `dir` (under its pack path), decoding and checking it
 * against the index: size, sha256, and no byte more than the index announced.
 */
export async function receiveMember(dir: string, file: PackFile, source: AsyncIterable<Buffer> | NodeJS.ReadableStream): Promise<void> {
  const target = path.join(dir, ...file.path.split("/"));
  await fsp.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
  let received = 0;
  const counted = async function* () {
    for await (const chunk of source as AsyncIterable<Buffer>) {
      received += chunk.length;
      if (received > file.encoded_bytes) throw badPack(`${file.path} is longer than its index says`);
      yield chunk;
    }
  };
  let result: { sha256: string; size: number };
  if (file.encoding === "sparse") {
    const decoder = new SparseDecoder(target, file.size);
    await pipeline(counted(), decoder).catch((err: Error) => {
      throw err instanceof ForkdError ? err : badPack(`${file.path}: ${err.message}`);
    });
    result = await decoder.result();
  } else {
    const hash = createHash("sha256");
    const out = await fsp.open(target, "wx", 0o600);
    try {
      for await (const chunk of counted()) {
        hash.update(chunk);
        await out.write(chunk);
      }
      await out.sync();
    } finally {
      await out.close();
    }
    result = { sha256: hash.digest("hex"), size: received };
  }
  if (received !== file.encoded_bytes) throw badPack(`${file.path} is ${received} bytes, its index says ${file.encoded_bytes}`);
  if (result.size !== file.size || result.sha256 !== file.sha256) {
    throw badPack(`${file.path} does not match its sha256 in the index (damaged or tampered with)`);
  }
}

export type UnpackResult = { tag: string; registered: string[]; reused: string[]; images_added: string[]; images_reused: string[] };

/** Unpack a pack file: verify everything, then register. */
export async function unpackFile(file: string, opts: { tag?: string; onProgress?: Progress } = {}): Promise<UnpackResult> {
  if (opts.tag !== undefined) validateName(opts.tag, "tag");
  const total = (await fsp.stat(file)).size;
  const { work, stageWork } = await snapshotWorkDirs();
  await fsp.rm(stageWork, { recursive: true, force: true });
  try {
    let index: PackIndex | undefined;
    const received = new Set<string>();
    const extract = tar.extract();
    let compressedRead = 0;
    const input = fs.createReadStream(file);
    input.on("data", (chunk) => {
      compressedRead += chunk.length;
      opts.onProgress?.(compressedRead, total, "verifying");
    });
    let readError: ForkdError | undefined;
    const reading = pipeline(input, new DecompressStream(), extract).catch((err: Error) => {
      // Closed early because a check below refused the content: that refusal is the reason.
      if ((err as NodeJS.ErrnoException).code === "ERR_STREAM_PREMATURE_CLOSE") throw err;
      readError =
        err instanceof ForkdError ? err : badPack(`${path.basename(file)} is damaged, cut short or not a forkd pack (${err.message})`);
      throw readError;
    });
    reading.catch(() => {});
    try {
      for await (const entry of extract) {
        const { name, type, size } = entry.header;
        if (type !== "file") throw badPack(`member ${name} is a ${type}, not a plain file`);
        if (!index) {
          if (name !== INDEX_NAME || (size ?? 0) > MAX_INDEX_BYTES) throw badPack(`its first member is ${name}, not ${INDEX_NAME}`);
          const chunks: Buffer[] = [];
          for await (const chunk of entry) chunks.push(chunk as Buffer);
          try {
            index = validateIndex(JSON.parse(Buffer.concat(chunks).toString("utf8")));
          } catch (err) {
            throw err instanceof ForkdError ? err : badPack(`its index is not JSON`);
          }
          await checkRoom(index);
          continue;
        }
        const declared = index.files.find((f) => f.path === name);
        if (!declared) throw badPack(`member ${name} is not in its index`);
        if (received.has(name)) throw badPack(`member ${name} appears twice`);
        if (size !== declared.encoded_bytes) throw badPack(`member ${name} is ${size} bytes, its index says ${declared.encoded_bytes}`);
        await receiveMember(work, declared, entry as unknown as AsyncIterable<Buffer>);
        received.add(name);
      }
    } catch (err) {
      // A broken stream surfaces in the loop too: the reader's reason is the one to give.
      await reading.catch(() => {});
      throw readError ?? err;
    }
    await reading;
    if (!index) throw badPack("it is empty");
    const missing = index.files.filter((f) => !received.has(f.path));
    if (missing.length) throw badPack(`it ends before ${missing.map((f) => f.path).join(", ")}`);
    faultPoint("unpack.verified");
    return await registerReceived(work, index, opts.tag);
  } finally {
    await fsp.rm(work, { recursive: true, force: true });
  }
}

/** Refuse before writing when the store's filesystem cannot take what the index announces. */
export async function checkRoom(index: PackIndex): Promise<void> {
  const need = index.files.reduce((sum, f) => sum + f.size, 0);
  const st = await fsp.statfs(snapshotsDir());
  const free = st.bavail * st.bsize;
  if (need > free) {
    throw new ForkdError(
      "over_limit",
      `the snapshot needs up to ${(need / 2 ** 30).toFixed(2)} GiB but ${snapshotsDir()} has ${(free / 2 ** 30).toFixed(2)} GiB free; free some space (forkd rmi, forkd image prune)`,
      { resource: "disk" },
    );
  }
}

/**
 * Move verified files from `work` into the store: image builds not already here,
 * then snapshots oldest first. A snapshot already here with the same memory is
 * reused; an ancestor whose tag is taken by other content is renamed
 * TAG-<digest prefix> (its layers name it by digest, so nothing else changes).
 */
export async function registerReceived(work: string, index: PackIndex, headTag?: string): Promise<UnpackResult> {
  const result: UnpackResult = { tag: "", registered: [], reused: [], images_added: [], images_reused: [] };
  const manifests = new Map<string, SnapshotManifest>();
  for (const t of index.snapshots) {
    const m = await readJson<SnapshotManifest>(path.join(work, "snapshots", t, "manifest.json")).catch(() => undefined);
    if (!m || m.tag !== t || !DIGEST_RE.test(String(m.memorySha256))) throw badPack(`snapshot ${t} has no valid manifest`);
    if (!index.images.some((i) => i.name === m.image?.name && i.digest === m.image?.digest)) {
      throw badPack(`snapshot ${t} uses an image the pack does not carry`);
    }
    const memory = index.files.find((f) => f.path === `snapshots/${t}/memory.bin`);
    if (m.layer) {
      const prev = index.snapshots[index.snapshots.indexOf(t) - 1];
      if (!prev || m.parent !== prev) throw badPack(`layer ${t} is not on the snapshot before it in the chain`);
      if (manifests.get(prev)?.memorySha256 !== m.layer.parentSha256)
        throw badPack(`layer ${t} was made on other memory than its parent's`);
    } else if (memory?.sha256 !== m.memorySha256) {
      throw badPack(`snapshot ${t}'s memory does not hash to its manifest's memorySha256`);
    }
    manifests.set(t, m);
  }
  const head = index.snapshots.at(-1)!;
  const finalHead = headTag ?? head;
  const existingHead = await getSnapshot(finalHead).catch(() => undefined);
  if (existingHead && existingHead.memorySha256 !== manifests.get(head)!.memorySha256) {
    throw new ForkdError("conflict", `snapshot ${finalHead} already exists with other contents; pick another name with --tag`, {
      tag: finalHead,
    });
  }
  for (const image of index.images) {
    const files = imageFiles(image.name, image.digest);
    const label = `${image.name}@${image.digest.slice(0, 12)}`;
    if (fs.existsSync(path.join(files.dir, "image.json"))) {
      result.images_reused.push(label);
      continue;
    }
    await fsp.mkdir(path.dirname(files.dir), { recursive: true, mode: 0o755 });
    const from = path.join(work, "images", image.name, image.digest);
    // Images are not secret and every VMM reads them.
    for (const name of await fsp.readdir(from)) await fsp.chmod(path.join(from, name), 0o644);
    await fsp.chmod(from, 0o755);
    await fsp.rename(from, files.dir).catch(async (err: NodeJS.ErrnoException) => {
      if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
    });
    await fsyncDir(path.dirname(files.dir));
    if (!fs.existsSync(path.join(imagesDir(), image.name, "current.json"))) {
      await writeFileAtomic(path.join(imagesDir(), image.name, "current.json"), await fsp.readFile(path.join(files.dir, "image.json")));
    }
    result.images_added.push(label);
  }
  const renamed = new Map<string, string>();
  for (const t of index.snapshots) {
    const m = manifests.get(t)!;
    let finalTag = t === head ? finalHead : t;
    const here = await getSnapshot(finalTag).catch(() => undefined);
    if (here && here.memorySha256 === m.memorySha256) {
      renamed.set(t, finalTag);
      result.reused.push(finalTag);
      continue;
    }
    if (here) {
      finalTag = `${t.slice(0, 47)}-${m.memorySha256.slice(0, 16)}`;
      const again = await getSnapshot(finalTag).catch(() => undefined);
      if (again && again.memorySha256 === m.memorySha256) {
        renamed.set(t, finalTag);
        result.reused.push(finalTag);
        continue;
      }
      if (again) throw new ForkdError("conflict", `snapshots ${t} and ${finalTag} already exist with other contents`, { tag: t });
    }
    renamed.set(t, finalTag);
    const dir = path.join(work, "snapshots", t);
    const parent = m.parent && m.layer ? (renamed.get(m.parent) ?? m.parent) : m.parent;
    if (finalTag !== t || parent !== m.parent) {
      await fsp.rm(path.join(dir, "manifest.json"));
      await writeFileAtomic(path.join(dir, "manifest.json"), `${JSON.stringify({ ...m, tag: finalTag, parent }, null, 2)}\n`, {
        mode: 0o444,
      });
    }
    for (const name of await fsp.readdir(dir)) await fsp.chmod(path.join(dir, name), 0o444);
    // Each snapshot is whole when it appears; a crash between two leaves the bases, never a layer without one.
    faultPoint("unpack.registering");
    await fsp.rename(dir, tagDir(finalTag)).catch((err: NodeJS.ErrnoException) => {
      if (err.code === "ENOTEMPTY" || err.code === "EEXIST") {
        throw new ForkdError("conflict", `snapshot ${finalTag} was created by someone else meanwhile`, { tag: finalTag });
      }
      throw err;
    });
    await fsyncDir(snapshotsDir());
    result.registered.push(finalTag);
  }
  result.tag = renamed.get(head) ?? finalHead;
  return result;
}
