// The pages a running VMM's guest wrote since its restore, copied while forkd holds
// it stopped (native/forkd-capture-pages.c does the copying, so guest memory never
// passes through this process). Here: where the guest RAM is mapped, and the
// helper's line protocol.
import { spawn } from "node:child_process";
import fs from "node:fs";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";

/** Where forkd-capture-pages is built: core's dist (`npm run build`), named from the package root so it is found from src/vmm (tests) as from dist/vmm. */
export function capturePagesPath(): string {
  return setting("capturePages") ?? fileURLToPath(new URL("../../dist/forkd-capture-pages", import.meta.url));
}

export type GuestRam = { start: number; pages: number; path: string; inode: number; deleted: boolean };

/** How forkd-seal-image names its memfd: this prefix, then the stage key of the image it copies. */
const SEALED_NAME = "/memfd:forkd-staged-image:";

/**
 * The guest RAM mapping in a VMM's /proc/PID/maps text: the one private mapping of
 * exactly the guest's size backed by a memory image (pure, for tests). A sealed
 * staged image (a memfd named after its stage key) stands for the staged file of
 * that key under `imagesDir`: the seals keep its bytes that file's, so `deleted`
 * only says whether the file must be staged again.
 */
export function findGuestRam(maps: string, memoryMib: number, imagesDir = "/nonexistent"): GuestRam | undefined {
  const size = memoryMib * 2 ** 20;
  const found: GuestRam[] = [];
  for (const line of maps.split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ (\d+)\s+(\/.*)$/.exec(line);
    if (!m) continue;
    const start = Number.parseInt(m[1]!, 16);
    const end = Number.parseInt(m[2]!, 16);
    const deleted = m[6]!.endsWith(" (deleted)");
    const file = deleted ? m[6]!.slice(0, -" (deleted)".length) : m[6]!;
    if (end - start !== size || m[3] !== "rw-p" || Number.parseInt(m[4]!, 16) !== 0) continue;
    const sealedKey = file.startsWith(SEALED_NAME) ? file.slice(SEALED_NAME.length) : undefined;
    if (sealedKey !== undefined) {
      if (!/^[A-Za-z0-9._-]+@[0-9a-f]+$/.test(sealedKey)) continue;
      found.push({ start, pages: size / 4096, path: `${imagesDir}/${sealedKey}/memory.bin`, inode: Number(m[5]), deleted: false });
      continue;
    }
    if (!file.endsWith("/memory.bin")) continue;
    found.push({ start, pages: size / 4096, path: file, inode: Number(m[5]), deleted });
  }
  return found.length === 1 ? found[0] : undefined;
}

export type PageCaptureOpts = {
  pid: number;
  ram: GuestRam;
  /** The RAM block's name in the stream ("mem": the memory backend's id) and the id of the "ram" section. */
  block: string;
  ramSectionId: number;
  /** A device-state stream of the same machine whose start (header, configuration, RAM setup) is reused. */
  prefixPath: string;
  out: { vmstate: string; layer: string; pagemap: string };
};

export type PageCapture = {
  /** Copy the written pages; the VMM must be stopped until this settles. Resolves with the number of pages. */
  copy(): Promise<number>;
  /** Write the stream: the first `prefixLength` bytes of the prefix, the pages, then `devicesPath`'s sections. Resolves with its size. */
  finish(devicesPath: string, prefixLength: number): Promise<number>;
  /** Stop the helper (after a failure). */
  kill(): void;
};

/** Start the helper and wait until it is ready, so the VMM's pause holds no process start-up. */
export async function startPageCapture(opts: PageCaptureOpts): Promise<PageCapture> {
  const helper = capturePagesPath();
  if (!fs.existsSync(helper)) {
    throw new ForkdError(
      "missing_dependency",
      `${helper} is not built; run \`npm run build\` (it needs gcc: apt-get install gcc libc6-dev)`,
    );
  }
  const child = spawn(
    helper,
    [
      "--pid",
      String(opts.pid),
      "--start",
      opts.ram.start.toString(16),
      "--pages",
      String(opts.ram.pages),
      "--block",
      opts.block,
      "--section",
      String(opts.ramSectionId),
      "--prefix",
      opts.prefixPath,
      "--vmstate",
      opts.out.vmstate,
      "--layer",
      opts.out.layer,
      "--pagemap",
      opts.out.pagemap,
    ],
    // Root, reading a VMM's memory: it needs none of the daemon's environment (tokens, credentials).
    { stdio: ["pipe", "pipe", "ignore"], env: {} },
  );
  const lines: string[] = [];
  const waiting: ((line: string | undefined) => void)[] = [];
  let ended = false;
  createInterface({ input: child.stdout! }).on("line", (line) => {
    const w = waiting.shift();
    if (w) w(line);
    else lines.push(line);
  });
  const onEnd = () => {
    ended = true;
    for (const w of waiting.splice(0)) w(undefined);
  };
  child.once("exit", onEnd);
  child.once("error", onEnd);
  child.stdin!.on("error", () => {});
  const next = async (expect: string, timeoutMs: number): Promise<string> => {
    const line =
      lines.shift() ??
      (ended
        ? undefined
        : await new Promise<string | undefined>((resolve) => {
            const timer = setTimeout(() => resolve(undefined), timeoutMs);
            waiting.push((l) => {
              clearTimeout(timer);
              resolve(l);
            });
          }));
    if (line?.startsWith(`${expect}`)) return line.slice(expect.length).trim();
    child.kill("SIGKILL");
    throw new ForkdError("io_error", `capturing the guest's pages failed: ${line?.replace(/^error /, "") ?? "the helper did not answer"}`);
  };
  await next("ready", 10_000);
  return {
    async copy() {
      child.stdin!.write("go\n");
      return Number(await next("captured", 60_000));
    },
    async finish(devicesPath, prefixLength) {
      child.stdin!.write(`devices ${devicesPath} ${prefixLength}\n`);
      const bytes = Number(await next("done", 120_000));
      child.stdin!.end();
      return bytes;
    },
    kill() {
      if (child.exitCode === null) child.kill("SIGKILL");
    },
  };
}
