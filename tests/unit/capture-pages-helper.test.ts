// forkd-capture-pages against a real process (no VM): a private mapping of a file
// whose pages were all read and a few written. The helper must find exactly the
// written pages, whether it asks the kernel with PAGEMAP_SCAN (the fast way, whose
// cost follows the pages touched, not the mapping's size) or reads every pagemap
// entry (kernels before 6.7), and both must write the same capture.
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { capturePagesPath } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const PAGE = 4096;
const PAGES = 4096;
/**
 * From page 100 on, about 6 pages in 10, scattered: hundreds of runs, so PAGEMAP_SCAN
 * is asked more than once. (Kernel 6.18 can report runs past the walk_end it answers,
 * and the next call then reports them again: seen with a QEMU guest, where a run
 * counted twice made the layer longer than its page map. This mapping does not
 * always provoke it; the helper counts each page once either way.)
 */
const SPARSE = Array.from({ length: PAGES - 100 }, (_, i) => 100 + i).filter((p) => (Math.imul(p, 2654435761) >>> 0) % 10 < 6);
const WRITTEN = [3, 10, 11, 12, 40, 50, ...SPARSE];
// On shmem, as staged images are (the page tables of a tmpfs mapping are what the scan walks in production).
const dir = fs.mkdtempSync("/dev/shm/forkd-capture-helper-");
let guest: ChildProcess;
let start: string;

// Maps the file private, reads every page, writes the WRITTEN ones (page 50 with a zero byte: it stays all zeros).
const GUEST = `
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, ${PAGES} * 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
for i in range(${PAGES}): m[i * 4096]
for i in (3, 10, 11, 12, 40): m[i * 4096:i * 4096 + 5] = b"hello"
m[50 * 4096] = 0
for i in range(100, ${PAGES}):
    if ((i * 2654435761) % 2**32) % 10 < 6: m[i * 4096] = 7
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m)))[2:], flush=True)
sys.stdin.read()
`;

beforeAll(async () => {
  const image = Buffer.alloc(PAGES * PAGE);
  for (let i = 0; i < PAGES; i++) if (i !== 50) image.fill((i % 250) + 1, i * PAGE, (i + 1) * PAGE);
  fs.writeFileSync(path.join(dir, "memory.bin"), image);
  const header = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
  fs.writeFileSync(path.join(dir, "prefix"), Buffer.concat([header, Buffer.from("prefix-rest")]));
  fs.writeFileSync(path.join(dir, "devices"), Buffer.concat([header, Buffer.from([0x00])]));
  guest = spawn("python3", ["-c", GUEST, path.join(dir, "memory.bin")], { stdio: ["pipe", "pipe", "inherit"] });
  start = await new Promise<string>((resolve) => createInterface({ input: guest.stdout! }).once("line", resolve));
});

afterAll(() => {
  guest.kill("SIGKILL");
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Run the helper's whole protocol with `method`; the files it wrote, or its error line. */
async function capture(
  method: string,
  name = method,
): Promise<{ error?: string; captured?: number; vmstate?: Buffer; layer?: Buffer; pagemap?: Buffer }> {
  const out = path.join(dir, name);
  fs.mkdirSync(out);
  const helper = spawn(
    capturePagesPath(),
    [
      ...["--pid", String(guest.pid), "--start", start, "--pages", String(PAGES), "--block", "mem", "--section", "2"],
      ...["--prefix", path.join(dir, "prefix"), "--vmstate", path.join(out, "vmstate"), "--layer", path.join(out, "layer")],
      ...["--pagemap", path.join(out, "pagemap"), "--method", method],
    ],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: helper.stdout! })[Symbol.asyncIterator]();
  const next = async () => String((await lines.next()).value ?? "");
  if ((await next()) !== "ready") throw new Error("the helper did not start");
  helper.stdin!.write("go\n");
  const captured = await next();
  if (!captured.startsWith("captured ")) return { error: captured };
  helper.stdin!.write(`devices ${path.join(dir, "devices")} 8\n`);
  expect(await next()).toMatch(/^done \d+$/);
  return {
    captured: Number(captured.slice("captured ".length)),
    vmstate: fs.readFileSync(path.join(out, "vmstate")),
    layer: fs.readFileSync(path.join(out, "layer")),
    pagemap: fs.readFileSync(path.join(out, "pagemap")),
  };
}

describe("forkd-capture-pages", () => {
  it("captures exactly the written pages by reading every pagemap entry", async () => {
    const read = await capture("read");
    expect(read.captured).toBe(WRITTEN.length);
    const bits = [...Array(PAGES).keys()].filter((p) => (read.pagemap![p >> 3]! >> (p & 7)) & 1);
    expect(bits).toEqual(WRITTEN);
    // The layer is the written pages back to back, as the guest left them.
    expect(read.layer!.length).toBe(WRITTEN.length * PAGE);
    expect(read.layer!.subarray(0, 5).toString()).toBe("hello");
    expect(read.layer![5]).toBe(3 + 1);
    expect(read.layer!.subarray(5 * PAGE, 6 * PAGE).every((b) => b === 0)).toBe(true);
    expect(read.layer![6 * PAGE]).toBe(7);
  });

  it("finds the same pages with PAGEMAP_SCAN and writes the same capture", async () => {
    const scan = await capture("scan");
    if (scan.error?.includes("no PAGEMAP_SCAN")) {
      expect(os.release()).toMatch(/^(?:[0-5]\.|6\.[0-6]\.)/);
      return;
    }
    const read = await capture("read", "read-2");
    expect(scan.error).toBeUndefined();
    expect(scan.captured).toBe(WRITTEN.length);
    // Buffer.equals: a deep comparison of megabytes byte by byte would take minutes.
    expect(scan.pagemap!.equals(read.pagemap!)).toBe(true);
    expect(scan.layer!.equals(read.layer!)).toBe(true);
    expect(scan.vmstate!.equals(read.vmstate!)).toBe(true);
  });
});
