// envd's filesystem.Filesystem service over the agent's `fs` and `watch` ops. Entries
// go out in envd's JSON shape (enum names, RFC 3339 times, int64 sizes as strings);
// everything the guest said about them was checked by the agent client first.
import { randomUUID } from "node:crypto";
import path from "node:path";
import type { FsEntry } from "@forkd/agent/protocol";
import type { AgentClient } from "@forkd/core";
import { ConnectError, type ServerStream, sendUnary } from "./connect.js";
import { type OpenStreams, toConnectError, userOf } from "./context.js";
import { openSandboxStream, type StreamCall } from "./process.js";

const FILE_TYPE: Record<FsEntry["type"], string> = {
  file: "FILE_TYPE_FILE",
  dir: "FILE_TYPE_DIRECTORY",
  symlink: "FILE_TYPE_SYMLINK",
  other: "FILE_TYPE_UNSPECIFIED",
};

const EVENT_TYPE = {
  create: "EVENT_TYPE_CREATE",
  write: "EVENT_TYPE_WRITE",
  remove: "EVENT_TYPE_REMOVE",
  rename: "EVENT_TYPE_RENAME",
  chmod: "EVENT_TYPE_CHMOD",
} as const;

/** The latest instant RFC 3339 can carry: a guest's mtime past it is shown as it. */
const MAX_TIME_MS = 253_402_300_799_999;

function entryJson(e: FsEntry): Record<string, unknown> {
  const ms = Math.min(Math.max(e.mtimeMs, 0), MAX_TIME_MS);
  return {
    name: e.name,
    type: FILE_TYPE[e.type],
    path: e.path,
    size: String(e.size),
    mode: e.mode,
    permissions: e.permissions,
    owner: e.owner,
    group: e.group,
    modifiedTime: new Date(ms).toISOString(),
    ...(e.symlinkTarget !== undefined ? { symlinkTarget: e.symlinkTarget } : {}),
  };
}

function pathField(value: unknown, name = "path"): string {
  if (typeof value !== "string" || value.includes("\0") || value.length > 4096) {
    throw new ConnectError("invalid_argument", `\`${name}\` must be a path of at most 4096 characters`);
  }
  return value;
}

function boolField(value: unknown, name: string): boolean {
  if (value === undefined || value === null) return false;
  if (typeof value !== "boolean") throw new ConnectError("invalid_argument", `\`${name}\` must be a boolean`);
  return value;
}

type WatchEventLine = { type: keyof typeof EVENT_TYPE; name: string };

/**
 * The agent's watch lines, split and checked: a line longer than any event, or one
 * that is not an event, is the guest breaking the protocol, and ends the watch.
 */
export class WatchLineParser {
  private partial = "";
  /** The directory the agent watches (its first line says). */
  dir: string | undefined;

  constructor(private readonly maxLineChars = 8192) {}

  push(chunk: Buffer): { events: WatchEventLine[]; dropped: number; started: boolean } {
    const text = this.partial + chunk.toString("utf8");
    const lines = text.split("\n");
    this.partial = lines.pop() ?? "";
    if (this.partial.length > this.maxLineChars) throw new ConnectError("internal", "the sandbox sent a watch event longer than any event");
    const events: WatchEventLine[] = [];
    let dropped = 0;
    let started = false;
    for (const line of lines) {
      if (line.length > this.maxLineChars) throw new ConnectError("internal", "the sandbox sent a watch event longer than any event");
      let value: unknown;
      try {
        value = JSON.parse(line);
      } catch {
        throw new ConnectError("internal", "the sandbox sent a watch event that is not JSON");
      }
      const v = value as Record<string, unknown>;
      if (typeof v !== "object" || v === null) throw new ConnectError("internal", "the sandbox sent a watch event that is not an object");
      if (v.type === "start" && this.dir === undefined && typeof v.path === "string" && v.path.startsWith("/") && v.path.length <= 4096) {
        this.dir = v.path;
        started = true;
      } else if (v.type === "dropped" && Number.isSafeInteger(v.count) && (v.count as number) > 0) {
        dropped += v.count as number;
      } else if (
        this.dir !== undefined &&
        typeof v.type === "string" &&
        Object.hasOwn(EVENT_TYPE, v.type) &&
        typeof v.name === "string" &&
        v.name.length <= 4096
      ) {
        events.push({ type: v.type as WatchEventLine["type"], name: v.name });
      } else {
        throw new ConnectError("internal", "the sandbox sent a watch event this protocol does not have");
      }
    }
    return { events, dropped, started };
  }
}

type WatchSink = {
  started: () => void;
  event: (e: { name: string; type: string; entry?: Record<string, unknown> }) => void;
};

/** Run one agent watch until `signal` aborts; events (with entries when asked) go to `sink` in order. */
async function runWatch(
  agent: AgentClient,
  request: { path: string; recursive: boolean; user: string },
  includeEntry: boolean,
  signal: AbortSignal,
  sink: WatchSink,
): Promise<void> {
  const parser = new WatchLineParser();
  let chain = Promise.resolve();
  let queued = 0;
  let failure: ConnectError | undefined;
  const local = new AbortController();
  const onAbort = () => local.abort();
  signal.addEventListener("abort", onAbort, { once: true });
  const watching = agent.watch(request, {
    signal: local.signal,
    onEvents: (chunk) => {
      if (failure) return;
      let parsed: ReturnType<WatchLineParser["push"]>;
      try {
        parsed = parser.push(chunk);
      } catch (err) {
        failure = err as ConnectError;
        local.abort();
        return;
      }
      if (parsed.started) sink.started();
      for (const e of parsed.events) {
        if (!includeEntry) {
          sink.event({ name: e.name, type: EVENT_TYPE[e.type] });
          continue;
        }
        // Entries are looked up one after another, so events keep their order; past 256 waiting, they go without.
        const withEntry = queued < 256;
        queued++;
        chain = chain.then(async () => {
          queued--;
          let entry: Record<string, unknown> | undefined;
          if (withEntry && e.type !== "remove") {
            entry = await agent
              .fs({ action: "info", path: path.join(parser.dir!, e.name), user: request.user })
              .then((r) => entryJson(r.entry))
              .catch(() => undefined);
          }
          sink.event({ name: e.name, type: EVENT_TYPE[e.type], ...(entry ? { entry } : {}) });
        });
      }
    },
  });
  try {
    await watching;
  } catch (err) {
    if (failure) throw failure;
    if (signal.aborted) return;
    throw toConnectError(err);
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/** Watchers of the polling API (CreateWatcher…), which E2B's synchronous Python SDK uses. */
type Watcher = { sandboxId: string; events: Record<string, unknown>[]; dropped: number; stop: () => void; error?: ConnectError };
const MAX_WATCHERS = 64;
const MAX_WATCHER_EVENTS = 10_000;

export class Watchers {
  private readonly byId = new Map<string, Watcher>();

  constructor(private readonly streams: OpenStreams) {}

  async create(
    agent: AgentClient,
    sandboxId: string,
    request: { path: string; recursive: boolean; user: string },
    includeEntry: boolean,
  ): Promise<string> {
    if (this.byId.size >= MAX_WATCHERS) throw new ConnectError("resource_exhausted", `${MAX_WATCHERS} watchers are open; remove one first`);
    const id = randomUUID();
    const abort = new AbortController();
    const watcher: Watcher = { sandboxId, events: [], dropped: 0, stop: () => abort.abort() };
    let startedResolve: () => void = () => undefined;
    const started = new Promise<void>((resolve) => {
      startedResolve = resolve;
    });
    const unregister = this.streams.add(sandboxId, (reason) => {
      watcher.error = reason;
      abort.abort();
    });
    const running = runWatch(agent, request, includeEntry, abort.signal, {
      started: startedResolve,
      event: (e) => {
        if (watcher.events.length >= MAX_WATCHER_EVENTS) watcher.dropped++;
        else watcher.events.push(e);
      },
    })
      .catch((err: unknown) => {
        watcher.error = toConnectError(err);
      })
      .finally(unregister);
    await Promise.race([started, running]);
    if (watcher.error) throw watcher.error;
    // A watch the guest ends later stays readable (its error) until removed.
    this.byId.set(id, watcher);
    return id;
  }

  take(id: unknown, sandboxId: string): Record<string, unknown>[] {
    const w = this.get(id, sandboxId);
    if (w.error && w.events.length === 0) throw w.error;
    return w.events.splice(0);
  }

  remove(id: unknown, sandboxId: string): void {
    const w = this.get(id, sandboxId);
    w.stop();
    this.byId.delete(id as string);
  }

  private get(id: unknown, sandboxId: string): Watcher {
    const w = typeof id === "string" ? this.byId.get(id) : undefined;
    if (!w || w.sandboxId !== sandboxId) throw new ConnectError("not_found", "watcher not found");
    return w;
  }
}

const FS_UNARY = new Set(["Stat", "ListDir", "MakeDir", "Move", "Remove", "CreateWatcher", "GetWatcherEvents", "RemoveWatcher"]);

export function isFilesystemMethod(method: string): "unary" | "server_stream" | undefined {
  if (method === "WatchDir") return "server_stream";
  if (FS_UNARY.has(method)) return "unary";
  return undefined;
}

export async function serveFilesystem(method: string, call: StreamCall, watchers: Watchers): Promise<void> {
  const { req, sandbox, message, deps } = call;
  const user = userOf(req);
  const agent = await deps.agent(sandbox.id);
  const fail = (err: unknown): never => {
    throw toConnectError(err);
  };
  switch (method) {
    case "Stat": {
      const r = await agent.fs({ action: "info", path: pathField(message.path), user }).catch(fail);
      return sendUnary(call.res, { entry: entryJson(r.entry) });
    }
    case "ListDir": {
      const depth = message.depth ?? 1;
      if (typeof depth !== "number" || !Number.isSafeInteger(depth) || depth < 0) {
        throw new ConnectError("invalid_argument", "`depth` must be a non-negative integer");
      }
      const r = await agent.fs({ action: "walk", path: pathField(message.path), depth: Math.max(1, depth), user }).catch(fail);
      return sendUnary(call.res, { entries: r.entries.map(entryJson) });
    }
    case "MakeDir": {
      const r = await agent.fs({ action: "mkdir", path: pathField(message.path), user }).catch(fail);
      return sendUnary(call.res, { entry: entryJson(r.entry) });
    }
    case "Move": {
      const r = await agent
        .fs({ action: "move", path: pathField(message.source, "source"), to: pathField(message.destination, "destination"), user })
        .catch(fail);
      return sendUnary(call.res, { entry: entryJson(r.entry) });
    }
    case "Remove":
      await agent.fs({ action: "remove", path: pathField(message.path), user }).catch(fail);
      return sendUnary(call.res, {});
    case "CreateWatcher": {
      const id = await watchers.create(
        agent,
        sandbox.id,
        { path: pathField(message.path), recursive: boolField(message.recursive, "recursive"), user },
        boolField(message.includeEntry, "includeEntry"),
      );
      return sendUnary(call.res, { watcherId: id });
    }
    case "GetWatcherEvents":
      return sendUnary(call.res, { events: watchers.take(message.watcherId, sandbox.id) });
    case "RemoveWatcher":
      watchers.remove(message.watcherId, sandbox.id);
      return sendUnary(call.res, {});
    case "WatchDir":
      return watchDir(call, agent, user);
    default:
      throw new ConnectError("unimplemented", `filesystem.Filesystem/${method} is not served`);
  }
}

async function watchDir(call: StreamCall, agent: AgentClient, user: string): Promise<void> {
  const { message } = call;
  const request = { path: pathField(message.path), recursive: boolField(message.recursive, "recursive"), user };
  const includeEntry = boolField(message.includeEntry, "includeEntry");
  // The directory is checked before the stream opens, so a missing one is a plain not_found.
  const info = await agent.fs({ action: "info", path: request.path, user }).catch((err: unknown) => {
    throw toConnectError(err);
  });
  if (info.entry.type !== "dir") throw new ConnectError("invalid_argument", `path is not a directory: ${info.entry.path}`);
  openSandboxStream(call, { keepalive: {} }, async (stream: ServerStream, signal) => {
    await runWatch(agent, request, includeEntry, signal, {
      started: () => stream.send({ start: {} }),
      event: (e) => stream.send({ filesystem: e }, true),
    });
  });
}
