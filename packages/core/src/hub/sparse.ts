// The sparse encoding packs and blobs carry large files in: a header, a bitmap of
// the 64 KiB blocks that hold anything but zeros, then those blocks. Guest memory
// and root images are mostly zeros, and holes are neither stored nor sent; the
// decoder writes only the data blocks, so the file it makes has the holes again.
import { createHash } from "node:crypto";
import fsp from "node:fs/promises";
import { Writable } from "node:stream";
import { inBackground } from "../common/background.js";

const SPARSE_MAGIC = Buffer.from("FKSPARSE1\n");
const SPARSE_BLOCK = 64 * 1024;
const HEADER_BYTES = SPARSE_MAGIC.length + 8 + 4;
const ZERO = Buffer.alloc(SPARSE_BLOCK);

export type SparsePlan = {
  file: string;
  size: number;
  /** One bit per block: set where the block holds data. */
  bitmap: Uint8Array;
  dataBlocks: number;
  /** sha256 of the file's whole content (holes read as zeros). */
  sha256: string;
  /** Bytes of the encoding. */
  encodedBytes: number;
};

function blockCount(size: number): number {
  return Math.ceil(size / SPARSE_BLOCK);
}

/** First pass: which blocks hold data, the file's digest, and the encoded size. */
export async function planSparse(file: string): Promise<SparsePlan> {
  const handle = await fsp.open(file, "r");
  try {
    const size = (await handle.stat()).size;
    const blocks = blockCount(size);
    const bitmap = new Uint8Array(Math.ceil(blocks / 8));
    const hash = createHash("sha256");
    const chunk = Buffer.alloc(SPARSE_BLOCK * 16);
    let dataBytes = 0;
    let dataBlocks = 0;
    for (let offset = 0; offset < size; offset += chunk.length) {
      const { bytesRead } = await handle.read(chunk, 0, Math.min(chunk.length, size - offset), offset);
      hash.update(chunk.subarray(0, bytesRead));
      for (let b = 0; b * SPARSE_BLOCK < bytesRead; b++) {
        const block = chunk.subarray(b * SPARSE_BLOCK, Math.min(bytesRead, (b + 1) * SPARSE_BLOCK));
        if (block.equals(ZERO.subarray(0, block.length))) continue;
        const index = offset / SPARSE_BLOCK + b;
        bitmap[index >> 3] = (bitmap[index >> 3] ?? 0) | (1 << (index & 7));
        dataBytes += block.length;
        dataBlocks++;
      }
    }
    return { file, size, bitmap, dataBlocks, sha256: hash.digest("hex"), encodedBytes: HEADER_BYTES + bitmap.length + dataBytes };
  } finally {
    await handle.close();
  }
}

function isSet(bitmap: Uint8Array, index: number): boolean {
  return ((bitmap[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

/** Second pass: the encoding, chunk by chunk (the file must not have changed since the plan). */
export async function* encodeSparse(plan: SparsePlan): AsyncGenerator<Buffer> {
  const header = Buffer.alloc(HEADER_BYTES);
  SPARSE_MAGIC.copy(header, 0);
  header.writeBigUInt64BE(BigInt(plan.size), SPARSE_MAGIC.length);
  header.writeUInt32BE(SPARSE_BLOCK, SPARSE_MAGIC.length + 8);
  yield header;
  yield Buffer.from(plan.bitmap);
  const handle = await fsp.open(plan.file, "r");
  try {
    const blocks = blockCount(plan.size);
    for (let index = 0; index < blocks; index++) {
      if (!isSet(plan.bitmap, index)) continue;
      const length = Math.min(SPARSE_BLOCK, plan.size - index * SPARSE_BLOCK);
      const block = Buffer.alloc(length);
      const { bytesRead } = await handle.read(block, 0, length, index * SPARSE_BLOCK);
      if (bytesRead !== length) throw new Error(`${plan.file} shrank while it was being packed`);
      yield block;
    }
  } finally {
    await handle.close();
  }
}

/**
 * A writable that decodes the sparse encoding into `target` (created fresh, never
 * through a link) and checks it: `result()` resolves with the content's sha256
 * and size once the stream ended, or rejects when the encoding is malformed or
 * longer than `maxSize` allows.
 */
export class SparseDecoder extends Writable {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private size = -1;
  private bitmap: Uint8Array | undefined;
  private blockIndex = 0;
  private readonly hash = createHash("sha256");
  private hashedUpTo = 0;
  private handle: fsp.FileHandle | undefined;
  private done!: (value: { sha256: string; size: number }) => void;
  private failed!: (err: Error) => void;
  private readonly finished = new Promise<{ sha256: string; size: number }>((resolve, reject) => {
    this.done = resolve;
    this.failed = reject;
  });

  constructor(
    private readonly target: string,
    private readonly maxSize: number,
  ) {
    super();
    this.finished.catch(() => {});
  }

  result(): Promise<{ sha256: string; size: number }> {
    return this.finished;
  }

  private take(n: number): Buffer | undefined {
    if (this.pendingBytes < n) return undefined;
    const all = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.pending = rest.length ? [rest] : [];
    this.pendingBytes = rest.length;
    return out;
  }

  private hashZerosUntil(offset: number): void {
    while (this.hashedUpTo < offset) {
      const n = Math.min(ZERO.length, offset - this.hashedUpTo);
      this.hash.update(ZERO.subarray(0, n));
      this.hashedUpTo += n;
    }
  }

  private nextDataBlock(): number {
    const blocks = blockCount(this.size);
    while (this.blockIndex < blocks && !isSet(this.bitmap!, this.blockIndex)) this.blockIndex++;
    return this.blockIndex;
  }

  // Writable ignores what _write and _final return: each runs its async body and
  // reports the outcome through the callback itself.
  override _write(chunk: Buffer, _enc: BufferEncoding, callback: (err?: Error) => void): void {
    this.decode(chunk).then(
      () => callback(),
      (err: Error) => {
        this.failed(err);
        callback(err);
      },
    );
  }

  private async decode(chunk: Buffer): Promise<void> {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    if (this.size < 0) {
      const header = this.take(HEADER_BYTES);
      if (!header) return;
      if (!header.subarray(0, SPARSE_MAGIC.length).equals(SPARSE_MAGIC)) throw new Error("not a forkd sparse encoding");
      const size = Number(header.readBigUInt64BE(SPARSE_MAGIC.length));
      if (header.readUInt32BE(SPARSE_MAGIC.length + 8) !== SPARSE_BLOCK) throw new Error("unsupported sparse block size");
      if (!Number.isSafeInteger(size) || size > this.maxSize)
        throw new Error(`declares ${size} bytes, more than the ${this.maxSize} allowed`);
      this.size = size;
      this.handle = await fsp.open(this.target, "wx", 0o600);
    }
    if (!this.bitmap) {
      const bitmap = this.take(Math.ceil(blockCount(this.size) / 8));
      if (!bitmap) return;
      this.bitmap = new Uint8Array(bitmap);
    }
    for (;;) {
      const index = this.nextDataBlock();
      if (index >= blockCount(this.size)) {
        if (this.pendingBytes > 0) throw new Error("has bytes after its last block");
        break;
      }
      const length = Math.min(SPARSE_BLOCK, this.size - index * SPARSE_BLOCK);
      const block = this.take(length);
      if (!block) break;
      this.hashZerosUntil(index * SPARSE_BLOCK);
      this.hash.update(block);
      this.hashedUpTo += length;
      await this.handle!.write(block, 0, length, index * SPARSE_BLOCK);
      this.blockIndex++;
    }
  }

  override _final(callback: (err?: Error) => void): void {
    this.finish().then(
      () => callback(),
      (err: Error) => callback(err),
    );
  }

  private async finish(): Promise<void> {
    try {
      if (this.size < 0 || !this.bitmap) throw new Error("ends before its header");
      if (this.nextDataBlock() < blockCount(this.size)) throw new Error("ends before its last block");
      await this.handle!.truncate(this.size);
      await this.handle!.sync();
      await this.handle!.close();
      this.hashZerosUntil(this.size);
      this.done({ sha256: this.hash.digest("hex"), size: this.size });
    } catch (err) {
      // The failure reported is the decoding's; a close failing after it adds nothing.
      await this.handle?.close().catch(() => {});
      this.failed(err as Error);
      throw err;
    }
  }

  override _destroy(err: Error | null, callback: (err?: Error | null) => void): void {
    if (this.handle) inBackground(`closing ${this.target}`, this.handle.close());
    if (err) this.failed(err);
    callback(err);
  }
}
