import fs from "node:fs/promises";
import path from "node:path";
import { writeFileAtomic } from "@forkd/atomic";
import { type FileEntry, type FilesRequest, MAX_FILE_BYTES } from "../protocol.js";
import { AgentOpError, fsError, requireString } from "./errors.js";

function absolute(p: unknown): string {
  const value = requireString(p, "path");
  if (!path.isAbsolute(value)) throw new AgentOpError("bad_request", `path must be absolute, got '${value}'`);
  if (value.includes("\0")) throw new AgentOpError("bad_request", "path must not contain NUL bytes");
  return path.normalize(value);
}

function entryType(stat: { isFile(): boolean; isDirectory(): boolean; isSymbolicLink(): boolean }): FileEntry["type"] {
  if (stat.isFile()) return "file";
  if (stat.isDirectory()) return "dir";
  if (stat.isSymbolicLink()) return "symlink";
  return "other";
}

export async function runFiles(request: FilesRequest): Promise<unknown> {
  const target = absolute(request.path);
  try {
    switch (request.action) {
      case "read": {
        const stat = await fs.stat(target);
        if (stat.isDirectory()) throw new AgentOpError("is_a_directory", `is a directory: ${target}`);
        if (stat.size > MAX_FILE_BYTES) {
          throw new AgentOpError(
            "too_large",
            `${target} is ${stat.size} bytes; one read returns at most ${MAX_FILE_BYTES} (use exec with head/tail or split it)`,
          );
        }
        const data = await fs.readFile(target);
        return { path: target, size: data.length, data: data.toString("base64") };
      }
      case "write":
        return await writeFile(target, request.data, request.mode, request.append === true);
      case "list": {
        const names = await fs.readdir(target);
        const entries: FileEntry[] = [];
        for (const name of names.sort()) {
          try {
            const stat = await fs.lstat(path.join(target, name));
            entries.push({ name, type: entryType(stat), size: stat.size, mode: stat.mode & 0o7777, mtimeMs: stat.mtimeMs });
          } catch {
            // Removed between readdir and lstat: skip it.
          }
        }
        return { path: target, entries };
      }
      case "stat": {
        const stat = await fs.lstat(target);
        return { path: target, type: entryType(stat), size: stat.size, mode: stat.mode & 0o7777, mtimeMs: stat.mtimeMs };
      }
      case "mkdir":
        await makeDirectories(target);
        return { path: target };
      case "remove":
        if (target === "/") throw new AgentOpError("bad_request", "refusing to remove /");
        await fs.rm(target, { recursive: request.recursive === true });
        return { path: target };
      default:
        throw new AgentOpError("bad_request", `unknown files action '${(request as { action: string }).action}'`);
    }
  } catch (err) {
    if (err instanceof AgentOpError) throw err;
    if ((err as NodeJS.ErrnoException).code === "ERR_FS_EISDIR") throw fsError({ code: "EISDIR" }, target);
    throw fsError(err, target);
  }
}

/**
 * mkdir -p, one level at a time. Node 20's `fs.mkdir(…, { recursive: true })` never
 * returns where mkdir answers ENOENT under a parent that exists (/proc/x: procfs
 * refuses new entries with ENOENT): it retries the parent forever, holding a libuv
 * thread, and the call waited for its deadline. Here every level is tried once.
 */
async function makeDirectories(target: string): Promise<void> {
  let current = "/";
  for (const part of target.split("/").filter(Boolean)) {
    current = path.join(current, part);
    try {
      await fs.mkdir(current);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      if (!(await fs.stat(current)).isDirectory()) throw Object.assign(new Error(`not a directory: ${current}`), { code: "ENOTDIR" });
    }
  }
}

/** A whole-file write is atomic (a reader never sees half a file); an append is not. */
async function writeFile(target: string, base64: unknown, mode: unknown, append: boolean) {
  if (typeof base64 !== "string") throw new AgentOpError("bad_request", "`data` must be a base64 string");
  const data = Buffer.from(base64, "base64");
  if (data.length > MAX_FILE_BYTES) {
    throw new AgentOpError("too_large", `one write takes at most ${MAX_FILE_BYTES} bytes, got ${data.length}`);
  }
  if (mode !== undefined && (typeof mode !== "number" || !Number.isInteger(mode) || mode < 0 || mode > 0o7777)) {
    throw new AgentOpError("bad_request", "`mode` must be an integer permission mode such as 420 (0o644)");
  }
  if (append) {
    await fs.appendFile(target, data, { mode: (mode as number | undefined) ?? 0o644 });
    return { path: target, size: (await fs.stat(target)).size };
  }
  await writeFileAtomic(target, data, { mode: (mode as number | undefined) ?? 0o644 });
  return { path: target, size: data.length };
}
