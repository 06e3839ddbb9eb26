// Staged images as children see them: a sealed memfd per staged file, held by a
// small root process (native/forkd-seal-image.c) and shared by every child of it.
// QEMU 7.2 opens mem-path read-write even for a private mapping, so a staged file
// children mapped by path had to be writable by every VMM; a memfd sealed against
// writes can be opened read-write and mapped copy-on-write, but written by no one.
// The staged file itself stays root's (0400): no VMM sees or opens it.
import { spawn } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { forkdRunDir } from "../common/config.js";
import { ensurePrivateDir, ensureRuntimeDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { sha256File } from "../common/fsutil.js";
import { processStartTime, sameProcess } from "../vmm/process.js";

/** Where forkd-seal-image is built: core's dist, named from the package root (found from src/ in tests as from dist/). */
function sealImagePath(): string {
  return fileURLToPath(new URL("../../dist/forkd-seal-image", import.meta.url));
}

/** What a holder's record says: who holds which staged file (by inode), with which bytes. */
type HolderRecord = { pid: number; start: string; dev: string; ino: string; sha256: string };

/** root's, 0700, never in a VMM's view (FORKD_RUN_DIR is hidden from every VMM). */
function holdersDir(): string {
  ensureRuntimeDir();
  return ensurePrivateDir(path.join(forkdRunDir(), "sealed"), { kind: "runtime dir (FORKD_RUN_DIR)" });
}

function recordPath(stagedFile: string): string {
  // One staged image per dir (images/KEY/memory.bin): the dir's name is the key.
  return path.join(holdersDir(), path.basename(path.dirname(stagedFile)));
}

function holderFd(pid: number): string {
  return `/proc/${pid}/fd/3`;
}

/** The record's holder still runs, is our program, holds a memfd and copied the staged file as it is now. */
function holderValid(record: HolderRecord, st: fs.BigIntStats, sha256: string): boolean {
  if (record.dev !== String(st.dev) || record.ino !== String(st.ino) || record.sha256 !== sha256) return false;
  if (!sameProcess(record.pid, record.start)) return false;
  try {
    if (fs.readlinkSync(`/proc/${record.pid}/exe`) !== fs.realpathSync(sealImagePath())) return false;
    return fs.readlinkSync(holderFd(record.pid)).startsWith("/memfd:forkd-staged-image");
  } catch {
    return false;
  }
}

function readRecord(file: string): HolderRecord | undefined {
  try {
    const parsed = JSON.parse(fs.readFileSync(file, "utf8")) as Partial<HolderRecord>;
    if (typeof parsed.pid !== "number" || typeof parsed.start !== "string" || typeof parsed.dev !== "string") return undefined;
    if (typeof parsed.ino !== "string" || typeof parsed.sha256 !== "string") return undefined;
    return parsed as HolderRecord;
  } catch {
    return undefined;
  }
}

/** Start a holder for `stagedFile`; resolves with its pid once the memfd is sealed. */
function startHolder(stagedFile: string): Promise<number> {
  const helper = sealImagePath();
  if (!fs.existsSync(helper)) {
    throw new ForkdError(
      "missing_dependency",
      `${helper} is not built; run \`npm run build\` (it needs gcc: apt-get install gcc libc6-dev)`,
    );
  }
  return new Promise((resolve, reject) => {
    const child = spawn(helper, [stagedFile], { env: {}, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("ready\n") && child.pid !== undefined) {
        child.unref();
        child.stdout.destroy();
        child.stderr.destroy();
        resolve(child.pid);
      }
    });
    child.stderr.on("data", (d: Buffer) => {
      err += d.toString().slice(0, 2000);
    });
    child.on("error", reject);
    child.on("exit", (code) => {
      if (!out.includes("ready\n")) {
        reject(
          new ForkdError("vm_start_failed", `could not seal the staged image ${stagedFile} (exit ${code}): ${err.trim() || "no output"}`),
        );
      }
    });
  });
}

function stopHolder(pid: number, start: string): void {
  if (!sameProcess(pid, start)) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // gone already
  }
}

const inFlight = new Map<string, Promise<string>>();

/**
 * The sealed memfd of a staged image, as a path the root launcher opens
 * (/proc/HOLDER/fd/3): the holder recorded for this file when it still holds
 * this very file's bytes, a new one otherwise. `sha256` is what the staged file
 * was verified to hold; the memfd is hashed once sealed and refused unless it
 * matches, so what children map is what registration recorded.
 */
export function sealedStagedImage(stagedFile: string, sha256: string): Promise<string> {
  const pending = inFlight.get(stagedFile);
  if (pending) return pending;
  const work = sealOnce(stagedFile, sha256).finally(() => inFlight.delete(stagedFile));
  inFlight.set(stagedFile, work);
  return work;
}

async function sealOnce(stagedFile: string, sha256: string): Promise<string> {
  const st = await fsp.lstat(stagedFile, { bigint: true });
  const file = recordPath(stagedFile);
  const known = readRecord(file);
  if (known && holderValid(known, st, sha256)) return holderFd(known.pid);
  const pid = await startHolder(stagedFile);
  const start = processStartTime(pid);
  const record: HolderRecord = { pid, start, dev: String(st.dev), ino: String(st.ino), sha256 };
  const sealedSha = await sha256File(holderFd(pid)).catch(() => "");
  const after = await fsp.lstat(stagedFile, { bigint: true }).catch(() => undefined);
  if (sealedSha !== sha256 || after?.ino !== st.ino || after.dev !== st.dev) {
    stopHolder(pid, start);
    throw new ForkdError(
      "integrity_failed",
      `the sealed copy of the staged image ${stagedFile} does not hold the verified bytes (sha256 ${sealedSha.slice(0, 16) || "unreadable"}…, expected ${sha256.slice(0, 16)}…): it changed while it was copied`,
      { path: stagedFile },
    );
  }
  // Another process may have sealed the same file meanwhile: one holder per file stays.
  const temp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(temp, JSON.stringify(record), { mode: 0o600 });
  const raced = readRecord(file);
  if (raced && raced.pid !== known?.pid && holderValid(raced, st, sha256)) {
    fs.rmSync(temp, { force: true });
    stopHolder(pid, start);
    return holderFd(raced.pid);
  }
  fs.renameSync(temp, file);
  if (known && known.pid !== pid) stopHolder(known.pid, known.start);
  return holderFd(pid);
}

/** Is a holder alive for this staged file (a cheap check, for admission's sizing; forks validate fully)? */
export function hasSealedCopy(stagedFile: string): boolean {
  const record = readRecord(recordPath(stagedFile));
  return record !== undefined && sameProcess(record.pid, record.start);
}

/** Holder records whose holder is gone (it exits once its staged file is removed): removed by cleanup. */
export async function removeStaleHolderRecords(): Promise<string[]> {
  const dir = path.join(forkdRunDir(), "sealed");
  const names = await fsp.readdir(dir).catch(() => [] as string[]);
  const removed: string[] = [];
  for (const name of names) {
    const file = path.join(dir, name);
    const record = readRecord(file);
    if (record && sameProcess(record.pid, record.start)) continue;
    await fsp.rm(file, { force: true });
    removed.push(file);
  }
  return removed;
}
