// Whether a process runs, and the one lock forkd keeps in a file: the file names
// its holder's pid, so a lock a crashed process left is taken over instead of
// wedging every later run.
import fs from "node:fs";
import fsp from "node:fs/promises";
import { ForkdError } from "./errors.js";

/**
 * `pid` names a running process (another user's too: EPERM means it exists). A
 * zombie is not running: it has exited and only waits for a parent that may never
 * reap it (a VMM whose launching CLI is gone, under an init that does not reap),
 * yet kill(0) still finds it and /proc still shows its uids.
 */
export function isAlive(pid: number): boolean {
  // kill(0) and kill(-1) would probe a process group: never a single process.
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  return !hasExited(pid);
}

/** The state letter of /proc/PID/stat is Z (zombie) or X (dead), or the entry is gone. */
function hasExited(pid: number): boolean {
  let fields: string[];
  try {
    fields = procStatFields(pid);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "ENOENT";
  }
  return fields[0] === "Z" || fields[0] === "X";
}

/**
 * The fields of /proc/PID/stat from the third (the state) on: the second, the
 * command name, may hold spaces and parentheses, so they start after its last ')'.
 * Throws what reading the file throws.
 */
export function procStatFields(pid: number): string[] {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
}

export type PidLockOpts = {
  /** How long to wait while a live process holds the lock (0: not at all). */
  waitMs: number;
  /** What to throw when a live process still holds it after `waitMs`. */
  busy: (holder: number) => ForkdError;
};

/** Locks this process holds: the file names only a pid, so two holders in one process queue here instead. */
const heldHere = new Map<string, Promise<void>>();

/** Run `work` holding the lock file `lock` (created 0600, never through a symlink); a dead holder's lock is taken over. */
export async function withPidLock<T>(lock: string, opts: PidLockOpts, work: () => Promise<T>): Promise<T> {
  for (let held = heldHere.get(lock); held; held = heldHere.get(lock)) await held;
  let release!: () => void;
  heldHere.set(
    lock,
    new Promise<void>((resolve) => {
      release = resolve;
    }),
  );
  try {
    await acquire(lock, opts);
    try {
      return await work();
    } finally {
      await fsp.rm(lock, { force: true });
    }
  } finally {
    heldHere.delete(lock);
    release();
  }
}

/** Takeovers of dead holders' locks in one acquire before giving up: more means something keeps recreating it. */
const MAX_TAKEOVERS = 3;
const POLL_MS = 50;

async function acquire(lock: string, opts: PidLockOpts): Promise<void> {
  const deadline = Date.now() + opts.waitMs;
  for (let takeovers = 0; ; ) {
    try {
      const handle = await fsp.open(
        lock,
        fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
        0o600,
      );
      try {
        await handle.writeFile(String(process.pid));
      } finally {
        await handle.close();
      }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const holder = Number((await fsp.readFile(lock, "utf8").catch(() => "")).trim());
    // Our own pid in the file is a predecessor's (this process queues its holders
    // above), so it is as dead as a pid that no longer runs.
    if (holder !== process.pid && isAlive(holder)) {
      if (Date.now() >= deadline) throw opts.busy(holder);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      continue;
    }
    if (++takeovers > MAX_TAKEOVERS) {
      throw new ForkdError("conflict", `the lock ${lock} came back ${MAX_TAKEOVERS} times after its dead holder's was removed`);
    }
    await fsp.rm(lock, { force: true });
  }
}
