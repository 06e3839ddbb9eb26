// One atomic write for the host and the guest agent: a reader sees the old
// content or the new, never half, and a crash leaves at most a dot-temp file.
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";

export type AtomicWriteOpts = {
  /** Permission bits of the new file (before the umask). */
  mode?: number;
};

/** Write `data` to a temp file beside `target` (O_EXCL, never following a link), fsync, rename over `target`, fsync the dir. */
export async function writeFileAtomic(target: string, data: string | Uint8Array, opts: AtomicWriteOpts = {}): Promise<void> {
  const temp = path.join(path.dirname(target), `.${path.basename(target)}.${randomBytes(6).toString("hex")}.tmp`);
  const handle = await fs.open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, opts.mode ?? 0o644);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } catch (err) {
    await handle.close();
    await fs.rm(temp, { force: true });
    throw err;
  }
  await handle.close();
  try {
    await fs.rename(temp, target);
  } catch (err) {
    await fs.rm(temp, { force: true });
    throw err;
  }
  await fsyncDir(path.dirname(target));
}

/** Make a rename or create in `dir` durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
