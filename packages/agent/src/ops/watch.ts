// The `watch` op: a directory's changes, through fs.watch (inotify on Linux), until the
// host cancels. inotify's reports come as Node's two kinds, which are told apart here:
// a "rename" of a path that exists is a create, of one that is gone a remove; a
// "change" whose ctime moved past its mtime is a chmod (a write moves both together).
import { watch as fsWatch } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { MAX_WATCHES, type WatchRequest } from "../protocol.js";
import { resolveUserPath } from "./entries.js";
import { AgentOpError, fsError } from "./errors.js";
import type { ChunkSink, OutputFlow } from "./exec.js";
import { lookupUser } from "./users.js";

let watching = 0;

type WatchEvent =
  | { type: "start"; path: string }
  | { type: "create" | "write" | "remove" | "chmod"; name: string }
  | { type: "dropped"; count: number };

export async function runWatch(request: WatchRequest, signal: AbortSignal, onChunk: ChunkSink, flow?: OutputFlow): Promise<never> {
  const user = lookupUser(request.user ?? "root");
  const dir = resolveUserPath(request.path, user);
  if (request.recursive !== undefined && typeof request.recursive !== "boolean") {
    throw new AgentOpError("bad_request", "`recursive` must be a boolean");
  }
  try {
    if (!(await fs.stat(dir)).isDirectory()) throw new AgentOpError("not_a_directory", `not a directory: ${dir}`);
  } catch (err) {
    if (err instanceof AgentOpError) throw err;
    throw fsError(err, dir);
  }
  if (watching >= MAX_WATCHES) {
    throw new AgentOpError("agent_busy", `${watching} directory watches already run in this sandbox, its limit; stop one first`);
  }
  watching++;
  let dropped = 0;
  const send = (event: WatchEvent) => {
    // A host slower than the events loses events, counted, never memory.
    if (flow?.full()) {
      dropped++;
      return;
    }
    if (dropped > 0) {
      const count = dropped;
      dropped = 0;
      onChunk("stdout", Buffer.from(`${JSON.stringify({ type: "dropped", count })}\n`));
    }
    onChunk("stdout", Buffer.from(`${JSON.stringify(event)}\n`));
  };
  const watcher = fsWatch(dir, { recursive: request.recursive === true, persistent: false }, (kind, filename) => {
    if (filename === null || signal.aborted) return;
    const name = filename.toString();
    const full = path.join(dir, name);
    fs.lstat(full).then(
      (st) => {
        if (kind === "rename") send({ type: "create", name });
        else send({ type: st.ctimeMs !== st.mtimeMs ? "chmod" : "write", name });
      },
      () => {
        if (kind === "rename") send({ type: "remove", name });
      },
    );
  });
  try {
    send({ type: "start", path: dir });
    await new Promise<void>((resolve, reject) => {
      watcher.on("error", (err) => reject(new AgentOpError("io_error", `watching ${dir} failed: ${err.message}`)));
      if (signal.aborted) resolve();
      signal.addEventListener("abort", () => resolve(), { once: true });
    });
    throw new AgentOpError("cancelled", `stopped watching ${dir}`);
  } finally {
    watcher.close();
    watching--;
  }
}
