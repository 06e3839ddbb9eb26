// Downloads that survive being interrupted: bytes go to NAME.partial in the
// store's hub area (FORKD_HOME/hub/blobs), keyed by what they should hash to; a
// later attempt hashes what is there and asks for the rest with a Range request.
// Only a file whose size and sha256 matched is renamed to NAME. One process at a
// time per file (a lock holding its pid; a dead holder's lock is taken over).
import { createHash } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { forkdHome } from "../common/config.js";
import { ensurePrivateDir, ensureStateDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { fsyncDir } from "../common/fsutil.js";
import { isAlive, withPidLock } from "../common/pid.js";
import { setting } from "../common/settings.js";
import { checkRedirect, type ResolveHost } from "./redirects.js";
import { plainHttpAllowed, type RefOpts } from "./reference.js";
import { unreachable } from "./registry-client.js";

export function hubDir(): string {
  return path.join(forkdHome(), "hub");
}

/** Blobs and packs being downloaded (.partial) or downloaded and verified, until their pull registers. */
export function blobsDir(): string {
  ensureStateDir();
  ensurePrivateDir(hubDir(), { kind: "state dir (FORKD_HOME)" });
  return ensurePrivateDir(path.join(hubDir(), "blobs"), { kind: "state dir (FORKD_HOME)" });
}

function stallMs(): number {
  return setting("registryTimeoutMs");
}

/** GET `url` following redirects by hand, each hop under the same http and address rules; no credentials are ever sent. */
export async function fetchFollowing(
  url: URL,
  opts: RefOpts & { headers?: Record<string, string>; signal?: AbortSignal; what: string; resolve?: ResolveHost },
): Promise<Response> {
  const origin = url;
  for (let hop = 0; ; hop++) {
    if (hop > 0) await checkRedirect(origin, url, opts.what, opts.resolve);
    if (url.protocol === "http:" && !plainHttpAllowed(url.host, opts)) {
      throw new ForkdError(
        "bad_request",
        `${opts.what}: ${url.origin} is plain http, which forkd refuses for hosts other than this machine's`,
      );
    }
    let res: Response;
    try {
      res = await fetch(url, {
        headers: { "user-agent": "forkd/0.1", ...opts.headers },
        redirect: "manual",
        signal: opts.signal ?? AbortSignal.timeout(stallMs()),
      });
    } catch (err) {
      throw unreachable(err, url, ` (${opts.what})`);
    }
    const location = res.headers.get("location");
    if ([301, 302, 303, 307, 308].includes(res.status) && location) {
      await res.body?.cancel().catch(() => {});
      if (hop >= 5) throw new ForkdError("registry_unreachable", `${opts.what}: more than 5 redirects from ${url.origin}${url.pathname}`);
      url = new URL(location, url);
      continue;
    }
    return res;
  }
}

/** Remove files in `dir` whose name carries the pid of a process that is gone (group 1 of `re`). */
export async function removeDeadTemps(dir: string, re: RegExp): Promise<void> {
  for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
    const m = re.exec(name);
    if (m && !isAlive(Number(m[1]))) await fsp.rm(path.join(dir, name), { recursive: true, force: true });
  }
}

export type Downloaded = {
  /** The verified bytes: `keepAt` when given, else the shared target. */
  file: string;
  size: number;
  sha256: string;
  /** Bytes that crossed the network this time. */
  downloaded: number;
};

/**
 * A private name for the verified target, made while the lock is held: another
 * pull that finishes first may remove the shared name, never these bytes.
 */
async function keep(target: string, keepAt: string | undefined): Promise<string> {
  if (!keepAt) return target;
  await fsp.mkdir(path.dirname(keepAt), { recursive: true, mode: 0o700 });
  await fsp.rm(keepAt, { force: true });
  await fsp.link(target, keepAt).catch(async (err: NodeJS.ErrnoException) => {
    if (err.code !== "EXDEV") throw err;
    await fsp.copyFile(target, keepAt);
  });
  return keepAt;
}

async function hashFile(file: string, hash: ReturnType<typeof createHash>): Promise<number> {
  let n = 0;
  try {
    for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 })) {
      hash.update(chunk as Buffer);
      n += (chunk as Buffer).length;
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  return n;
}

/**
 * Bring `target` here: reuse it when it is already complete and verified,
 * otherwise continue TARGET.partial from where it stopped (`open(from)` makes
 * the request; a server that ignores Range starts it over). The result's size
 * and sha256 must match `expect` where given: a mismatch removes the bytes.
 */
export async function resumableDownload(opts: {
  target: string;
  expect: { size?: number; sha256?: string };
  open: (from: number, signal: AbortSignal) => Promise<Response>;
  /** Also link the verified bytes here (see keep). */
  keepAt?: string;
  /** For messages ("blob sha256:… of team/app"). */
  what: string;
  onBytes?: (n: number) => void;
}): Promise<Downloaded> {
  const { target, expect } = opts;
  // One process at a time per file; another one's download is not waited for.
  const busy = (holder: number) =>
    new ForkdError("conflict", `another forkd process (pid ${holder}) is downloading ${opts.what} right now; wait for it to finish`, {
      pid: holder,
    });
  return withPidLock(`${target}.lock`, { waitMs: 0, busy }, async () => {
    if (fs.existsSync(target) && expect.sha256) {
      const hash = createHash("sha256");
      const size = await hashFile(target, hash);
      const sha256 = hash.digest("hex");
      if (sha256 === expect.sha256 && (expect.size === undefined || size === expect.size))
        return { file: await keep(target, opts.keepAt), size, sha256, downloaded: 0 };
      await fsp.rm(target, { force: true });
    }
    const partial = `${target}.partial`;
    let downloaded = 0;
    for (let restart = 0; ; restart++) {
      const hash = createHash("sha256");
      let have = await hashFile(partial, hash);
      if (expect.size !== undefined && have > expect.size) {
        await fsp.rm(partial, { force: true });
        continue;
      }
      if (expect.size === undefined || have < expect.size) {
        const controller = new AbortController();
        let timer = setTimeout(() => controller.abort(), stallMs());
        const res = await opts.open(have, controller.signal).catch((err: unknown) => {
          clearTimeout(timer);
          throw err;
        });
        const range = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
        const resumes = res.status === 206 && range && Number(range[1]) === have;
        if (!resumes && (have > 0 || res.status !== 200)) {
          clearTimeout(timer);
          await res.body?.cancel().catch(() => {});
          // The server did not continue where we stopped (no Range support, or the bytes changed): start over, once.
          await fsp.rm(partial, { force: true });
          if (restart >= 1 && res.status !== 200) {
            throw new ForkdError("registry_unreachable", `${opts.what}: the server answered HTTP ${res.status} to a download`);
          }
          if (restart >= 2) throw new ForkdError("registry_unreachable", `${opts.what}: the server did not answer a download twice`);
          continue;
        }
        const out = await fsp.open(
          partial,
          fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_APPEND | fs.constants.O_NOFOLLOW,
          0o600,
        );
        try {
          for await (const chunk of (res.body ?? []) as AsyncIterable<Uint8Array>) {
            clearTimeout(timer);
            timer = setTimeout(() => controller.abort(), stallMs());
            have += chunk.length;
            if (expect.size !== undefined && have > expect.size) {
              throw new ForkdError(
                "integrity_failed",
                `${opts.what} is longer than the ${expect.size} bytes announced; refused, nothing was registered`,
              );
            }
            hash.update(chunk);
            await out.write(chunk);
            downloaded += chunk.length;
            opts.onBytes?.(chunk.length);
          }
          await out.sync();
        } catch (err) {
          if (err instanceof ForkdError) {
            await fsp.rm(partial, { force: true });
            throw err;
          }
          throw new ForkdError(
            "registry_unreachable",
            `the download of ${opts.what} broke off after ${have} bytes (${controller.signal.aborted ? `no data for ${stallMs() / 1000} s` : ((err as { cause?: Error }).cause?.message ?? (err as Error).message)}); what arrived is kept: run the pull again to resume`,
          );
        } finally {
          clearTimeout(timer);
          await out.close();
        }
      }
      const sha256 = hash.digest("hex");
      if ((expect.size !== undefined && have !== expect.size) || (expect.sha256 && sha256 !== expect.sha256)) {
        await fsp.rm(partial, { force: true });
        throw new ForkdError(
          "integrity_failed",
          expect.size !== undefined && have !== expect.size
            ? `${opts.what} is ${have} bytes, ${expect.size} were announced (cut short or damaged); refused, nothing was registered`
            : `${opts.what} does not match its sha256 (damaged or tampered with: expected ${expect.sha256}, got ${sha256}); refused, nothing was registered`,
        );
      }
      await fsp.rename(partial, target);
      await fsyncDir(path.dirname(target));
      return { file: await keep(target, opts.keepAt), size: have, sha256, downloaded };
    }
  });
}
