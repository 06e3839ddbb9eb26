// Diff layers: a snapshot branched from another stores only the guest pages that
// differ from its parent's memory — `layer.bin` holds those pages back to back in
// page order, `pagemap.bin` has one bit per page saying which pages are in it.
// (A bitmap, not holes: a page the child zeroed must still override the parent.)
// Forking from a chain head assembles the whole image once, when it is staged.
import fsp from "node:fs/promises";

export const PAGE_BYTES = 4096;
/** Pages compared per read: large reads keep the comparison near memory speed. */
const CHUNK_PAGES = 256;

export type LayerStats = { pages: number; changedPages: number; layerBytes: number };

export function pagemapBytes(memoryBytes: number): number {
  return Math.ceil(memoryBytes / PAGE_BYTES / 8);
}

function pageIsSet(map: Uint8Array, page: number): boolean {
  return ((map[page >> 3] ?? 0) & (1 << (page & 7))) !== 0;
}

function setPage(map: Uint8Array, page: number): void {
  map[page >> 3] = (map[page >> 3] ?? 0) | (1 << (page & 7));
}

/** How many pages a map marks (the number of pages its layer must hold). */
function countPages(map: Uint8Array): number {
  let n = 0;
  for (const byte of map) {
    let b = byte;
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

/**
 * Write the pages of `childPath` that differ from `parentPath` (same size) into
 * `layerPath` and their map into `mapPath`.
 */
export async function writeDiffLayer(parentPath: string, childPath: string, layerPath: string, mapPath: string): Promise<LayerStats> {
  const [parentSize, childSize] = [(await fsp.stat(parentPath)).size, (await fsp.stat(childPath)).size];
  if (parentSize !== childSize || childSize % PAGE_BYTES !== 0) {
    throw new Error(`memory images differ in size (${parentSize} vs ${childSize}) or are not whole pages`);
  }
  const pages = childSize / PAGE_BYTES;
  const map = new Uint8Array(pagemapBytes(childSize));
  const parent = await fsp.open(parentPath, "r");
  const child = await fsp.open(childPath, "r");
  const layer = await fsp.open(layerPath, "wx", 0o600);
  const a = Buffer.alloc(CHUNK_PAGES * PAGE_BYTES);
  const b = Buffer.alloc(CHUNK_PAGES * PAGE_BYTES);
  let changedPages = 0;
  try {
    for (let first = 0; first < pages; first += CHUNK_PAGES) {
      const count = Math.min(CHUNK_PAGES, pages - first);
      const length = count * PAGE_BYTES;
      const position = first * PAGE_BYTES;
      await Promise.all([parent.read(a, 0, length, position), child.read(b, 0, length, position)]);
      // Runs of changed pages go out in one write.
      let runStart = -1;
      for (let i = 0; i <= count; i++) {
        const changed = i < count && a.compare(b, i * PAGE_BYTES, (i + 1) * PAGE_BYTES, i * PAGE_BYTES, (i + 1) * PAGE_BYTES) !== 0;
        if (changed) {
          setPage(map, first + i);
          changedPages++;
          if (runStart < 0) runStart = i;
        } else if (runStart >= 0) {
          await layer.write(b, runStart * PAGE_BYTES, (i - runStart) * PAGE_BYTES);
          runStart = -1;
        }
      }
    }
    await layer.sync();
  } finally {
    await Promise.all([parent.close(), child.close(), layer.close()]);
  }
  await fsp.writeFile(mapPath, map, { mode: 0o600, flag: "wx" });
  return { pages, changedPages, layerBytes: changedPages * PAGE_BYTES };
}

/**
 * Apply a layer onto `targetPath`, which holds a copy of the parent's memory:
 * afterwards it is the child's memory, byte for byte.
 */
export async function applyDiffLayer(targetPath: string, layerPath: string, mapPath: string): Promise<void> {
  const map = new Uint8Array(await fsp.readFile(mapPath));
  const target = await fsp.open(targetPath, "r+");
  const layer = await fsp.open(layerPath, "r");
  const expected = countPages(map) * PAGE_BYTES;
  const actual = (await layer.stat()).size;
  if (actual !== expected) throw new Error(`layer ${layerPath} is ${actual} bytes but its page map marks ${expected}`);
  const size = (await target.stat()).size;
  if (pagemapBytes(size) !== map.length) throw new Error(`page map ${mapPath} does not fit a ${size}-byte memory image`);
  const buffer = Buffer.alloc(CHUNK_PAGES * PAGE_BYTES);
  let layerOffset = 0;
  try {
    const pages = size / PAGE_BYTES;
    let page = 0;
    while (page < pages) {
      if (!pageIsSet(map, page)) {
        page++;
        continue;
      }
      let run = 1;
      while (page + run < pages && run < CHUNK_PAGES && pageIsSet(map, page + run)) run++;
      const length = run * PAGE_BYTES;
      await layer.read(buffer, 0, length, layerOffset);
      await target.write(buffer, 0, length, page * PAGE_BYTES);
      layerOffset += length;
      page += run;
    }
  } finally {
    await Promise.all([target.close(), layer.close()]);
  }
}
