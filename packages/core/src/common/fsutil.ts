export { fsyncDir, writeFileAtomic } from "@forkd/atomic";

import { createHash } from "node:crypto";
import { closeSync, createReadStream, constants as fsConstants, fstatSync, openSync, readSync } from "node:fs";
import fs from "node:fs/promises";

export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(file, { highWaterMark: 1 << 20 })
      .on("data", (chunk) => hash.update(chunk))
      .on("error", reject)
      .on("end", () => resolve(hash.digest("hex")));
  });
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

export async function readJson<T>(file: string): Promise<T | undefined> {
  try {
    return JSON.parse(await fs.readFile(file, "utf8")) as T;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

// A VMM owns its runtime dir, so a QEMU that escaped its seccomp filter can put a
// symlink, a FIFO or a hard link where forkd expects its log or pid file. Root
// touches files there only through these: never following the last component,
// never blocking on a FIFO, never writing an inode that has another name, and
// reading no more than it asked for. (The dir itself lies in root's 0700 vms dir,
// which no VMM can change, so only the last component needs the care.)
const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fsConstants;

/**
 * The last `maxBytes` of a regular file in a dir a VMM can write; undefined when it
 * is missing, or anything but a regular file with one name (a symlink, a FIFO, a
 * device, a hard link to someone else's file).
 */
export async function readVmmFile(file: string, maxBytes: number): Promise<Buffer | undefined> {
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = await handle.stat();
    if (!st.isFile() || st.nlink !== 1) return undefined;
    const length = Math.min(st.size, maxBytes);
    const buf = Buffer.alloc(length);
    const { bytesRead } = await handle.read(buf, 0, length, st.size - length);
    return buf.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/**
 * Write a fresh file in a dir a VMM can write: whatever is at that name (a symlink
 * to /etc/shadow, say) is unlinked, never followed, and the new file is created
 * exclusively, so a name swapped back in meanwhile makes this fail, not write through.
 */
export async function writeVmmFile(file: string, data: string | Buffer, mode = 0o600): Promise<void> {
  await fs.rm(file, { force: true });
  const handle = await fs.open(file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK, mode);
  try {
    await handle.writeFile(data);
  } finally {
    await handle.close();
  }
}

/** readVmmFile, synchronously (for checks that run inside synchronous decisions). */
export function readVmmFileSync(file: string, maxBytes: number): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || st.nlink !== 1) return undefined;
    const length = Math.min(st.size, maxBytes);
    const buf = Buffer.alloc(length);
    const bytesRead = readSync(fd, buf, 0, length, st.size - length);
    return buf.subarray(0, bytesRead);
  } finally {
    closeSync(fd);
  }
}
