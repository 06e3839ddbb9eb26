// The `fs` op: a filesystem as E2B's envd presents it. Paths may be relative (to the
// user's home) or start with ~; entries carry owner and group names, the permission
// bits, Go's permission string and, for a symlink, its resolved absolute target;
// directories and files made here belong to the user the caller names, as do the
// parent directories made for them.
import type { Stats } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { type FsEntry, type FsRequest, MAX_FILE_BYTES } from "../protocol.js";
import { AgentOpError, fsError } from "./errors.js";
import { type GuestUser, groupName, lookupUser, userName } from "./users.js";

/** Entries one walk returns at most; past it the caller is told to ask for less depth. */
const MAX_WALK_ENTRIES = 10_000;
/** Deepest walk: a directory tree deeper than this is not listed in one call. */
const MAX_WALK_DEPTH = 64;

/** `~` and `~/x` are the user's home; a relative path is taken from it. */
export function resolveUserPath(value: unknown, user: GuestUser): string {
  if (typeof value !== "string") throw new AgentOpError("bad_request", "`path` must be a string");
  if (value.includes("\0")) throw new AgentOpError("bad_request", "path must not contain NUL bytes");
  if (value.length > 4096) throw new AgentOpError("bad_request", "path is longer than 4096 characters");
  let p = value;
  if (p === "~") p = user.home;
  else if (p.startsWith("~/")) p = path.join(user.home, p.slice(2));
  return path.resolve(user.home, p);
}

/** Go's os.FileMode.String(): type letters (dalTLDpSugct?) or '-', then rwxrwxrwx. */
function goPermissions(mode: number): string {
  const S_IFMT = 0o170000;
  const kind = mode & S_IFMT;
  let letters = "";
  if (kind === 0o040000) letters += "d";
  if (kind === 0o120000) letters += "L";
  if (kind === 0o060000 || kind === 0o020000) letters += "D";
  if (kind === 0o010000) letters += "p";
  if (kind === 0o140000) letters += "S";
  if (mode & 0o4000) letters += "u";
  if (mode & 0o2000) letters += "g";
  if (kind === 0o020000) letters += "c";
  if (mode & 0o1000) letters += "t";
  const rwx = "rwxrwxrwx";
  let bits = "";
  for (let i = 0; i < 9; i++) bits += mode & (1 << (8 - i)) ? rwx[i] : "-";
  return (letters || "-") + bits;
}

function kindOf(st: Stats): FsEntry["type"] {
  if (st.isFile()) return "file";
  if (st.isDirectory()) return "dir";
  if (st.isSymbolicLink()) return "symlink";
  return "other";
}

/**
 * One entry, as envd describes it: a symlink has its target's type and permission
 * bits (a dangling one is "other"), its own permission string, and its target fully
 * resolved (or its own path when that fails).
 */
async function describe(target: string, st?: Stats): Promise<FsEntry> {
  const own = st ?? (await fs.lstat(target));
  let type = kindOf(own);
  let mode = own.mode & 0o777;
  let symlinkTarget: string | undefined;
  if (own.isSymbolicLink()) {
    try {
      symlinkTarget = await fs.realpath(target);
      const followed = await fs.stat(symlinkTarget);
      type = kindOf(followed);
      mode = followed.mode & 0o777;
    } catch {
      symlinkTarget ??= target;
      type = "other";
      mode = 0;
    }
  }
  return {
    name: path.basename(target) || "/",
    type,
    path: target,
    size: own.size,
    mode,
    permissions: goPermissions(own.mode),
    owner: userName(own.uid),
    group: groupName(own.gid),
    mtimeMs: own.mtimeMs,
    ...(symlinkTarget !== undefined ? { symlinkTarget } : {}),
  };
}

/** Entries under `root` to `depth` levels, parents before children, names in byte order; symlinks are not followed. */
async function walk(root: string, depth: number): Promise<FsEntry[]> {
  const resolved = await fs.realpath(root);
  const top = await fs.stat(resolved);
  if (!top.isDirectory()) throw new AgentOpError("not_a_directory", `not a directory: ${root}`);
  const out: FsEntry[] = [];
  const visit = async (dir: string, shown: string, level: number): Promise<void> => {
    let names: string[];
    try {
      names = await fs.readdir(dir);
    } catch (err) {
      if (level === 1) throw err;
      return; // A subdirectory that went away or cannot be read is skipped, as a walk does.
    }
    names.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    for (const name of names) {
      let st: Stats;
      try {
        st = await fs.lstat(path.join(dir, name));
      } catch {
        continue;
      }
      if (out.length >= MAX_WALK_ENTRIES) {
        throw new AgentOpError("too_large", `${root} has more than ${MAX_WALK_ENTRIES} entries to depth ${depth}; list with less depth`);
      }
      out.push(await describe(path.join(shown, name), st));
      if (st.isDirectory() && level < depth) await visit(path.join(dir, name), path.join(shown, name), level + 1);
    }
  };
  await visit(resolved, root, 1);
  return out;
}

/** mkdir -p whose new levels belong to `user`; says whether the last level was made here. */
async function makeDirs(target: string, user: GuestUser): Promise<boolean> {
  let current = "/";
  let made = false;
  for (const part of target.split("/").filter(Boolean)) {
    current = path.join(current, part);
    try {
      await fs.mkdir(current, 0o755);
      made = true;
      await fs.chown(current, user.uid, user.gid);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      made = false;
      if (!(await fs.stat(current)).isDirectory()) throw Object.assign(new Error(`not a directory: ${current}`), { code: "ENOTDIR" });
    }
  }
  return made;
}

function decodeData(value: unknown): Buffer {
  if (typeof value !== "string" || value.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(value)) {
    throw new AgentOpError("bad_request", "`data` must be base64");
  }
  const data = Buffer.from(value, "base64");
  if (data.length > MAX_FILE_BYTES) throw new AgentOpError("too_large", `one write takes at most ${MAX_FILE_BYTES} bytes`);
  return data;
}

function nonNegative(value: unknown, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
    throw new AgentOpError("bad_request", `\`${name}\` must be a non-negative integer`);
  }
  return value;
}

export async function runFs(request: FsRequest): Promise<unknown> {
  const user = lookupUser(request.user ?? "root");
  const target = resolveUserPath(request.path, user);
  try {
    switch (request.action) {
      case "info":
        return { entry: await describe(target) };
      case "walk": {
        const depth = nonNegative(request.depth, "depth", 1);
        if (depth < 1 || depth > MAX_WALK_DEPTH) throw new AgentOpError("bad_request", `\`depth\` must be from 1 to ${MAX_WALK_DEPTH}`);
        return { entries: await walk(target, depth) };
      }
      case "mkdir": {
        const existing = await fs.stat(target).catch(() => undefined);
        if (existing?.isDirectory()) throw new AgentOpError("exists", `directory already exists: ${target}`);
        if (existing) throw new AgentOpError("not_a_directory", `path already exists but it is not a directory: ${target}`);
        await makeDirs(target, user);
        return { entry: await describe(target) };
      }
      case "move": {
        const to = resolveUserPath(request.to, user);
        await makeDirs(path.dirname(to), user);
        await fs.rename(target, to);
        return { entry: await describe(to) };
      }
      case "remove":
        if (target === "/") throw new AgentOpError("bad_request", "refusing to remove /");
        // As envd: removing what is not there is not an error.
        await fs.rm(target, { recursive: true, force: true });
        return { path: target };
      case "write": {
        const data = decodeData(request.data);
        const existing = await fs.stat(target).catch(() => undefined);
        if (existing?.isDirectory()) throw new AgentOpError("is_a_directory", `path is a directory: ${target}`);
        await makeDirs(path.dirname(target), user);
        if (request.append === true) await fs.appendFile(target, data);
        else await fs.writeFile(target, data);
        await fs.chown(target, user.uid, user.gid);
        return { entry: { name: path.basename(target), type: "file", path: target } };
      }
      case "read": {
        const offset = nonNegative(request.offset, "offset", 0);
        const length = Math.min(nonNegative(request.length, "length", MAX_FILE_BYTES), MAX_FILE_BYTES);
        const handle = await fs.open(target, "r");
        try {
          const st = await handle.stat();
          if (st.isDirectory()) throw new AgentOpError("is_a_directory", `path is a directory: ${target}`);
          const want = Math.max(0, Math.min(length, st.size - offset));
          const buffer = Buffer.alloc(want);
          const { bytesRead } = want > 0 ? await handle.read(buffer, 0, want, offset) : { bytesRead: 0 };
          return { path: target, size: st.size, data: buffer.subarray(0, bytesRead).toString("base64") };
        } finally {
          await handle.close();
        }
      }
      default:
        throw new AgentOpError("bad_request", `unknown fs action '${(request as { action: string }).action}'`);
    }
  } catch (err) {
    if (err instanceof AgentOpError) throw err;
    if ((err as NodeJS.ErrnoException).code === "ERR_FS_EISDIR") throw fsError({ code: "EISDIR" }, target);
    throw fsError(err, target);
  }
}
