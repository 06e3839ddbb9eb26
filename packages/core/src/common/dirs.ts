// forkd's own directories (state, runtime, staging) hold sockets, memory images and
// the database a root-run forkd trusts. One that another user owns or can write
// would let that user swap what forkd reads or redirect what it writes, so such a
// directory is refused rather than used.
import fs from "node:fs";
import path from "node:path";
import { forkdHome, forkdRunDir, shmDir } from "./config.js";
import { ForkdError } from "./errors.js";

/** What the check needs to know of a directory: lstat's answer, never stat's. */
export type DirFacts = { uid: number; mode: number; isDirectory: boolean; isSymbolicLink: boolean };

export type DirVerdict = { ok: true } | { ok: false; problem: string; fix: string };

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, "0");
}

/** Whether forkd (running as `euid`) may keep its own files in this directory. */
export function privateDirVerdict(dir: string, facts: DirFacts, euid: number): DirVerdict {
  if (facts.isSymbolicLink) {
    return {
      ok: false,
      problem: "is a symlink (whoever can change it chooses where forkd writes)",
      fix: `replace it with a real directory, or point forkd at the target directly`,
    };
  }
  if (!facts.isDirectory) return { ok: false, problem: "is not a directory", fix: `remove it or choose another directory` };
  if (facts.uid !== euid) {
    return {
      ok: false,
      problem: `is owned by uid ${facts.uid}, not by forkd's uid ${euid}`,
      fix: `chown ${euid} ${dir}, or choose a directory you own`,
    };
  }
  if ((facts.mode & 0o022) !== 0) {
    return {
      ok: false,
      problem: `has mode ${octal(facts.mode)}: ${facts.mode & 0o002 ? "anyone" : "its group"} can write it`,
      fix: `chmod go-w ${dir} (forkd creates its directories 0700), or choose another directory`,
    };
  }
  return { ok: true };
}

/**
 * Whether a directory above one of forkd's may stay there: anyone who can write
 * it can rename forkd's directory away and put their own in its place, unless the
 * sticky bit stops them (as on /tmp and /dev/shm).
 */
export function parentDirVerdict(dir: string, facts: Omit<DirFacts, "isSymbolicLink">, euid: number): DirVerdict {
  if (facts.uid !== 0 && facts.uid !== euid) {
    return { ok: false, problem: `is owned by uid ${facts.uid}`, fix: `chown ${euid} ${dir}, or choose a directory elsewhere` };
  }
  if ((facts.mode & 0o002) !== 0 && (facts.mode & 0o1000) === 0) {
    return {
      ok: false,
      problem: `has mode ${octal(facts.mode)}: anyone can write it and it has no sticky bit`,
      fix: `chmod o-w ${dir} (or chmod +t), or choose a directory elsewhere`,
    };
  }
  return { ok: true };
}

function lstatFacts(st: fs.Stats): DirFacts {
  return { uid: st.uid, mode: st.mode, isDirectory: st.isDirectory(), isSymbolicLink: st.isSymbolicLink() };
}

function refuse(kind: string, dir: string, verdict: { problem: string; fix: string }): never {
  throw new ForkdError("unsafe_path", `forkd's ${kind} ${dir} ${verdict.problem}; fix: ${verdict.fix}`, { path: dir });
}

function euid(): number {
  return process.geteuid?.() ?? 0;
}

/** Refuse `dir` if it exists and is not private to us; its parents must not let others replace it. */
function checkPrivateDir(dir: string, kind = "directory"): boolean {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
  const verdict = privateDirVerdict(dir, lstatFacts(st), euid());
  if (!verdict.ok) refuse(kind, dir, verdict);
  for (let parent = path.dirname(dir); ; parent = path.dirname(parent)) {
    // Parents are followed through symlinks (/var/run → /run is normal); what matters is who can write where they lead.
    const pst = fs.statSync(parent);
    const pv = parentDirVerdict(parent, { uid: pst.uid, mode: pst.mode, isDirectory: pst.isDirectory() }, euid());
    if (!pv.ok) refuse(`${kind}'s parent`, parent, pv);
    if (parent === path.dirname(parent)) break;
  }
  return true;
}

/**
 * Make (or accept) one of forkd's directories: created with `mode` (0700 unless a
 * confined VMM needs to traverse it), refused if it exists and is a symlink, not
 * ours, or writable by group or others. Missing parents are created 0755.
 */
export function ensurePrivateDir(dir: string, opts: { mode?: number; kind?: string } = {}): string {
  const mode = opts.mode ?? 0o700;
  const kind = opts.kind ?? "directory";
  if (checkPrivateDir(dir, kind)) return dir;
  fs.mkdirSync(path.dirname(dir), { recursive: true, mode: 0o755 });
  let created = false;
  try {
    fs.mkdirSync(dir, { mode });
    created = true;
  } catch (err) {
    // Another forkd process made it meanwhile: the check below judges theirs like any other.
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
  }
  // mkdir's mode passes through the umask; the mode we asked for is the one we mean.
  if (created) {
    const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY | fs.constants.O_NOFOLLOW);
    try {
      fs.fchmodSync(fd, mode);
    } finally {
      fs.closeSync(fd);
    }
  }
  checkPrivateDir(dir, kind);
  return dir;
}

/** FORKD_HOME, checked (and made 0700 if missing) before forkd keeps anything there. */
export function ensureStateDir(): string {
  return ensurePrivateDir(forkdHome(), { kind: "state dir (FORKD_HOME)" });
}

/** FORKD_RUN_DIR: sockets and pid files of every VM. */
export function ensureRuntimeDir(): string {
  return ensurePrivateDir(forkdRunDir(), { kind: "runtime dir (FORKD_RUN_DIR)" });
}

/** FORKD_SHM_DIR and its images/ dir: the staged memory images children map. */
export function ensureStagingDir(): string {
  ensurePrivateDir(shmDir(), { kind: "staging dir (FORKD_SHM_DIR)" });
  return ensurePrivateDir(path.join(shmDir(), "images"), { kind: "staging dir (FORKD_SHM_DIR)" });
}
