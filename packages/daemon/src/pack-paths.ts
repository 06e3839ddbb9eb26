// Where a pack may be written or read from. Over TCP the bearer token is all a
// caller has shown, and the daemon is root: a path the caller names freely would
// let the token write a root-owned file anywhere on the host (or read any file as
// a pack). So a TCP caller's pack lives under $FORKD_HOME/packs, a directory we
// create 0700 and root alone can change. The unix socket is 0600 and root's: its
// caller is root already, so there the caller's own absolute path is used.
import fs from "node:fs";
import path from "node:path";
import { ForkdError, forkdHome } from "@forkd/core";

function packsDir(): string {
  return path.join(forkdHome(), "packs");
}

function refuse(requested: string, dir: string, why: string): never {
  throw new ForkdError(
    "bad_request",
    `${JSON.stringify(requested)} ${why}: over TCP a pack is written to and read from ${dir} only; give a file name there (e.g. base.forkd.tar.zst) or use the daemon's unix socket`,
    { path: requested, allowed_dir: dir },
  );
}

/**
 * Pure: the file a TCP caller's name stands for inside `dir`. A relative name
 * resolves in `dir`; an absolute one must already lie inside it; any `..` segment
 * is refused outright (even one that would stay inside), so the rule is the text.
 */
export function confinedPackPath(requested: string, dir: string): string {
  if (requested.length === 0 || requested.includes("\0")) refuse(requested, dir, "is not a file name");
  if (requested.split("/").includes("..")) refuse(requested, dir, "contains ..");
  const resolved = path.resolve(dir, requested);
  if (!resolved.startsWith(`${dir}/`)) refuse(requested, dir, "is outside the packs directory");
  return resolved;
}

/**
 * The packs directory (made 0700 if missing) and every existing component between
 * it and the file must be real directories / files, not symlinks: a link placed
 * there would lead root's write or read elsewhere.
 */
export function refuseSymlinkedComponents(file: string, dir: string, requested: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  let current = dir;
  const rest = path.relative(dir, file).split("/");
  for (const part of ["", ...rest]) {
    current = part === "" ? current : path.join(current, part);
    let st: fs.Stats;
    try {
      st = fs.lstatSync(current);
    } catch {
      return; // not there yet: nothing beyond it exists to be a link
    }
    if (st.isSymbolicLink()) refuse(requested, dir, `passes through the symlink ${current}`);
  }
}

/** The path the pack or unpack job uses, per transport (see the top of this file). */
export function packPathFor(requested: string, confine: boolean): string {
  if (!confine) {
    if (!path.isAbsolute(requested) || requested.includes("\0")) {
      throw new ForkdError("bad_request", `${JSON.stringify(requested)} must be an absolute path on the daemon's host`, {
        path: requested,
      });
    }
    return requested;
  }
  const dir = packsDir();
  const file = confinedPackPath(requested, dir);
  refuseSymlinkedComponents(file, dir, requested);
  return file;
}
