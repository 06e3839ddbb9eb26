// Forwarding: any node answers any call. A call for a sandbox another node runs is
// sent on to that node as it came (method, path, query, body streamed both ways, so
// exec streams, NDJSON and file transfers pass through), at most one hop: the
// forwarded request carries FORWARDED_HEADER and the cluster token, and a node never
// forwards a request that carries it. The client's own Authorization header is for
// the node it called and is not passed on.
import http, { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from "node:http";
import https from "node:https";
import { ForkdError } from "@forkd/core";

/** Marks a node-to-node request (its value: the node that sent it). Such a request is served where it lands. */
export const FORWARDED_HEADER = "x-forkd-forwarded-by";
/** The cluster secret on a node-to-node request (never the client's bearer token). */
export const CLUSTER_TOKEN_HEADER = "x-forkd-cluster-token";
/** On every forwarded answer: the node that served it. */
const SERVED_BY_HEADER = "x-forkd-node";

const SANDBOX_PATH_RE = /^\/v1\/sandboxes\/([^/?#]+)(?:\/[^?#]*)?$/;

/** What a node does with a request before its own routes see it (pure: tests/unit decides each case). */
export type ForwardPlan =
  | { kind: "local" }
  | { kind: "forward"; node: string }
  | { kind: "unreachable"; node: string }
  | { kind: "deferred_delete"; node: string; id: string }
  | { kind: "merge"; list: "sandboxes" | "snapshots" };

/** The sandbox id a /v1/sandboxes/ID[/…] path names, undefined otherwise. */
export function sandboxIdOf(path: string): string | undefined {
  const m = SANDBOX_PATH_RE.exec(path.split("?")[0] ?? path);
  return m ? decodeURIComponent(m[1]!) : undefined;
}

/** The list a GET asks for when it is one of the lists merged across nodes. */
export function mergedListOf(method: string, path: string): "sandboxes" | "snapshots" | undefined {
  if (method !== "GET") return undefined;
  const p = (path.split("?")[0] ?? path).replace(/\/+$/, "");
  if (p === "/v1/sandboxes") return "sandboxes";
  if (p === "/v1/snapshots") return "snapshots";
  return undefined;
}

/**
 * Where a request goes. `forwarded` requests and sandboxes this node runs (its
 * SQLite says so) are served here; a sandbox the catalog puts on a live node is
 * forwarded there; on a node without a lease it is unreachable (a DELETE is recorded
 * for when the node returns); a sandbox no one catalogued is served here (a 404).
 */
export function planRequest(req: {
  method: string;
  path: string;
  forwarded: boolean;
  self: string;
  /** Does this node's SQLite have the sandbox the path names? */
  runsHere: (id: string) => boolean;
  /** The catalog's owner of a sandbox (looked up only when needed). */
  owner: string | undefined;
  liveNodes: ReadonlySet<string>;
}): ForwardPlan {
  if (req.forwarded) return { kind: "local" };
  const list = mergedListOf(req.method, req.path);
  if (list) return { kind: "merge", list };
  const id = sandboxIdOf(req.path);
  if (id === undefined || req.runsHere(id)) return { kind: "local" };
  const owner = req.owner;
  if (owner === undefined || owner === req.self) return { kind: "local" };
  if (req.liveNodes.has(owner)) return { kind: "forward", node: owner };
  const isKill = req.method === "DELETE" && /^\/v1\/sandboxes\/[^/?#]+\/?$/.test(req.path.split("?")[0] ?? "");
  if (isKill) return { kind: "deferred_delete", node: owner, id };
  return { kind: "unreachable", node: owner };
}

/** Headers not passed on: hop-by-hop (RFC 9110 7.6.1), the client's credential, and anything claiming to be ours. */
const DROPPED_REQUEST_HEADERS = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authorization",
  "te",
  "trailer",
  "upgrade",
  "host",
  "authorization",
  FORWARDED_HEADER,
  CLUSTER_TOKEN_HEADER,
]);
const DROPPED_RESPONSE_HEADERS = new Set(["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding"]);

function forwardedRequestHeaders(incoming: IncomingHttpHeaders, self: string, clusterToken: string): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(incoming)) {
    if (value === undefined || DROPPED_REQUEST_HEADERS.has(name.toLowerCase())) continue;
    out[name] = value;
  }
  out[FORWARDED_HEADER] = self;
  out[CLUSTER_TOKEN_HEADER] = clusterToken;
  return out;
}

function requestFn(url: URL): typeof http.request {
  return url.protocol === "https:" ? https.request : http.request;
}

/** Keep-alive agents per scheme: a forwarded call should not pay a TCP handshake each time. */
const AGENTS = {
  "http:": new http.Agent({ keepAlive: true, maxSockets: 64 }),
  "https:": new https.Agent({ keepAlive: true, maxSockets: 64 }),
};

function agentFor(url: URL): http.Agent {
  return url.protocol === "https:" ? AGENTS["https:"] : AGENTS["http:"];
}

/**
 * Send `req` on to `base` + its path and stream the answer back into `res`. Rejects
 * with `node_unreachable` when the node cannot be reached before anything was sent
 * back (the caller answers 503); after that, a broken stream just ends the response.
 */
export function proxyRequest(opts: {
  req: IncomingMessage;
  res: ServerResponse;
  base: string;
  node: string;
  self: string;
  clusterToken: string;
  connectTimeoutMs: number;
}): Promise<{ status: number }> {
  const { req, res, node } = opts;
  const target = new URL(req.url ?? "/", opts.base);
  return new Promise((resolve, reject) => {
    let answered = false;
    const upstream = requestFn(target)(target, {
      method: req.method,
      headers: forwardedRequestHeaders(req.headers, opts.self, opts.clusterToken),
      agent: agentFor(target),
    });
    // The connection, not the call: an exec may rightly run for minutes.
    const connectTimer = setTimeout(
      () => upstream.destroy(new Error(`no connection within ${opts.connectTimeoutMs} ms`)),
      opts.connectTimeoutMs,
    );
    upstream.on("socket", (socket) => {
      if (!socket.connecting) clearTimeout(connectTimer);
      else socket.once("connect", () => clearTimeout(connectTimer));
    });
    upstream.on("response", (answer) => {
      clearTimeout(connectTimer);
      answered = true;
      const headers: http.OutgoingHttpHeaders = {};
      for (const [name, value] of Object.entries(answer.headers)) {
        if (value !== undefined && !DROPPED_RESPONSE_HEADERS.has(name)) headers[name] = value;
      }
      headers[SERVED_BY_HEADER] = node;
      res.writeHead(answer.statusCode ?? 502, headers);
      // A streamed answer goes out as it arrives (exec stream, NDJSON): no buffering here.
      res.flushHeaders();
      answer.pipe(res);
      answer.on("error", () => res.destroy());
      res.on("close", () => {
        if (!answer.complete) answer.destroy();
        resolve({ status: answer.statusCode ?? 502 });
      });
    });
    upstream.on("error", (err) => {
      clearTimeout(connectTimer);
      if (answered) {
        res.destroy();
        return;
      }
      reject(new ForkdError("node_unreachable", `node ${node} (${opts.base}) did not answer: ${err.message}`, { node }));
    });
    // The client went away: stop the call on the owner too (an exec stream is cancelled there).
    res.on("close", () => {
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  });
}

/** A JSON call to another node's API as a forwarded request (it is served there, never sent on). */
export async function peerRequest<T = unknown>(opts: {
  base: string;
  node: string;
  self: string;
  clusterToken: string;
  method: string;
  path: string;
  body?: unknown;
  timeoutMs: number;
}): Promise<{ status: number; body: T; headers: IncomingHttpHeaders }> {
  const target = new URL(opts.path, opts.base);
  const payload = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body));
  return new Promise((resolve, reject) => {
    const request = requestFn(target)(
      target,
      {
        method: opts.method,
        agent: agentFor(target),
        headers: {
          accept: "application/json",
          [FORWARDED_HEADER]: opts.self,
          [CLUSTER_TOKEN_HEADER]: opts.clusterToken,
          ...(payload ? { "content-type": "application/json", "content-length": String(payload.length) } : {}),
        },
        timeout: opts.timeoutMs,
      },
      (answer) => {
        const chunks: Buffer[] = [];
        answer.on("data", (c: Buffer) => chunks.push(c));
        answer.on("error", reject);
        answer.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let body: unknown = text;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            // not JSON: the text itself
          }
          resolve({ status: answer.statusCode ?? 502, body: body as T, headers: answer.headers });
        });
      },
    );
    request.on("timeout", () => request.destroy(new Error(`no answer within ${opts.timeoutMs} ms`)));
    request.on("error", (err) =>
      reject(new ForkdError("node_unreachable", `node ${opts.node} (${opts.base}) did not answer: ${err.message}`, { node: opts.node })),
    );
    request.end(payload);
  });
}

function plainPath(path: string): string {
  return (path.split("?")[0] ?? path).replace(/\/+$/, "") || "/";
}

/** Calls that start work on this node: refused (503 `cluster_unavailable`) while it holds no lease. */
const NEW_WORK: readonly [string, RegExp][] = [
  ["POST", /^\/v1\/sandboxes$/],
  ["POST", /^\/v1\/sandboxes\/[^/]+\/(branch|fork)$/],
  ["POST", /^\/v1\/snapshots$/],
  ["POST", /^\/v1\/snapshots\/(pull|unpack)$/],
  ["POST", /^\/v1\/snapshots\/[^/]+\/compact$/],
  ["PUT", /^\/v1\/snapshots\/[^/]+\/pool$/],
  ["POST", /^\/v1\/workspaces$/],
  ["POST", /^\/v1\/workspaces\/[^/]+\/resume$/],
];

/** Does this call start new work (a sandbox, a snapshot, a pool) rather than act on what runs? */
export function isNewWork(method: string, path: string): boolean {
  const p = plainPath(path);
  return NEW_WORK.some(([m, re]) => m === method && re.test(p));
}

/** Calls after which the set of sandboxes here may differ: the catalog is brought up to date before their answer leaves. */
export function changesSandboxes(method: string, path: string): boolean {
  if (method === "GET" || method === "HEAD") return false;
  const p = plainPath(path);
  return (
    /^\/v1\/sandboxes(\/[^/]+(\/fork)?)?$/.test(p) ||
    /^\/v1\/snapshots\/[^/]+(\/pool)?$/.test(p) ||
    /^\/v1\/workspaces(\/[^/]+(\/suspend|\/resume)?)?$/.test(p)
  );
}
