// How a clustered daemon answers any call: before its own routes see a request, a
// call for a sandbox another node runs is forwarded there (streamed, one hop), a
// call for a sandbox on a node without a lease answers 503 `node_unreachable` (a
// kill is recorded for when it returns), the two lists are merged across the live
// nodes, and new work waits while this node holds no lease. After a call that
// changed what runs here, the catalog is brought up to date before the answer
// leaves; a call that creates a tag claims it cluster-wide first. Without
// --cluster none of this runs: a single daemon's wire is unchanged.
import {
  CLUSTER_TOKEN_HEADER,
  type ClusterNode,
  changesSandboxes,
  FORWARDED_HEADER,
  isNewWork,
  keys,
  planRequest,
  proxyRequest,
  sandboxIdOf,
  tagCreatedBy,
} from "@forkd/cluster";
import { ForkdError, getSandbox, isForkdError } from "@forkd/core";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { errorBody } from "./http-errors.js";
import type { ServerContext } from "./routes/context.js";

declare module "fastify" {
  interface FastifyRequest {
    /** A tag this request claimed cluster-wide: released again if the request fails. */
    claimedTag?: string;
  }
}

function runsHere(id: string): boolean {
  try {
    getSandbox(id);
    return true;
  } catch {
    return false;
  }
}

function header(request: FastifyRequest, name: string): string | undefined {
  const value = request.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/** Is this a node-to-node request (served here, never sent on)? Authenticated by the onRequest auth hook. */
export function isForwarded(request: FastifyRequest): boolean {
  return header(request, FORWARDED_HEADER) !== undefined;
}

export function clusterTokenOf(request: FastifyRequest): string | undefined {
  return header(request, CLUSTER_TOKEN_HEADER);
}

/** A node record's URL if the node holds its lease now, else undefined. */
async function liveUrl(cluster: ClusterNode, node: string): Promise<string | undefined> {
  const raw = await cluster.etcd.get(keys.node(node));
  if (!raw) return undefined;
  try {
    return (JSON.parse(raw) as { url?: string }).url;
  } catch {
    return undefined;
  }
}

async function sendJson(reply: FastifyReply, status: number, body: unknown, headers: Record<string, string> = {}): Promise<FastifyReply> {
  // A string goes out as it is: the route's response schema would strip the `node` field a merged list adds.
  return reply.code(status).headers(headers).type("application/json; charset=utf-8").send(JSON.stringify(body));
}

async function mergeList(app: FastifyInstance, cluster: ClusterNode, request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  let nodes: { name: string; url: string }[];
  const missing: string[] = [];
  try {
    nodes = await cluster.nodes();
  } catch (err) {
    // etcd unreachable: this node still lists what it holds.
    if (!isForkdError(err, "cluster_unavailable")) throw err;
    nodes = [];
    missing.push("etcd");
  }
  if (!nodes.some((n) => n.name === cluster.name)) nodes.push({ name: cluster.name, url: cluster.config.url });
  const parts = await Promise.all(
    nodes.map(async (node): Promise<unknown[]> => {
      try {
        if (node.name === cluster.name) {
          const res = await app.inject({
            method: "GET",
            url: request.url,
            headers: { [FORWARDED_HEADER]: cluster.name, [CLUSTER_TOKEN_HEADER]: cluster.token },
          });
          if (res.statusCode !== 200) throw new ForkdError("internal", `listing here answered ${res.statusCode}`);
          return (res.json() as unknown[]).map((item) => ({ ...(item as object), node: node.name }));
        }
        const res = await cluster.call<unknown[]>(
          node as Parameters<ClusterNode["call"]>[0],
          "GET",
          request.url,
          undefined,
          cluster.config.timeoutMs * 2,
        );
        if (res.status !== 200 || !Array.isArray(res.body)) throw new Error(`answered ${res.status}`);
        return res.body.map((item) => ({ ...(item as object), node: node.name }));
      } catch {
        missing.push(node.name);
        return [];
      }
    }),
  );
  return sendJson(reply, 200, parts.flat(), missing.length ? { "x-forkd-cluster-partial": missing.join(",") } : {});
}

export function registerClusterHooks(app: FastifyInstance, ctx: ServerContext): void {
  const log = ctx.log;
  app.addHook("onRequest", async (request, reply) => {
    const cluster = ctx.cluster;
    if (!cluster || reply.sent || request.url === "/healthz") return;
    const path = request.url;
    const forwarded = isForwarded(request);
    const id = forwarded ? undefined : sandboxIdOf(path);
    let owner: string | undefined;
    let url: string | undefined;
    if (id !== undefined && !runsHere(id)) {
      owner = await cluster.sandboxNode(id);
      if (owner !== undefined && owner !== cluster.name) url = await liveUrl(cluster, owner);
    }
    const plan = planRequest({
      method: request.method,
      path,
      forwarded,
      self: cluster.name,
      runsHere: () => false,
      owner,
      liveNodes: new Set(url && owner ? [owner] : []),
    });
    switch (plan.kind) {
      case "merge":
        return mergeList(app, cluster, request, reply);
      case "unreachable":
        throw new ForkdError(
          "node_unreachable",
          `sandbox ${id} runs on node ${plan.node}, which holds no cluster lease now (stopped, cut off or crashed); its calls answer again when it rejoins`,
          { id, node: plan.node },
        );
      case "deferred_delete": {
        await cluster.catalog.recordDelete(plan.node, "sandbox", plan.id);
        await cluster.catalog.forget(plan.id, plan.node);
        return sendJson(reply, 202, {
          id: plan.id,
          node: plan.node,
          deferred: true,
          message: `node ${plan.node} holds no cluster lease now: the kill is recorded and applied when it rejoins`,
        });
      }
      case "forward": {
        reply.hijack();
        const started = performance.now();
        let status = 502;
        try {
          ({ status } = await proxyRequest({
            req: request.raw,
            res: reply.raw,
            base: url!,
            node: plan.node,
            self: cluster.name,
            clusterToken: cluster.token,
            connectTimeoutMs: cluster.config.timeoutMs,
          }));
        } catch (err) {
          const e = isForkdError(err) ? err : new ForkdError("node_unreachable", (err as Error).message, { node: plan.node });
          status = e.httpStatus;
          if (!reply.raw.headersSent) {
            reply.raw.writeHead(e.httpStatus, { "content-type": "application/json; charset=utf-8" });
            reply.raw.end(JSON.stringify(errorBody(e.code, e.message, e.details)));
          } else reply.raw.destroy();
        }
        // A hijacked reply skips onResponse: the audit line is written here, saying where the call went.
        ctx.audit.write({
          ts: new Date().toISOString(),
          method: request.method,
          path: path.split("?")[0] ?? path,
          status,
          latency_ms: Math.round((performance.now() - started) * 100) / 100,
          remote: request.ip ?? "unix",
          user_agent: String(request.headers["user-agent"] ?? ""),
          sandboxes: [id!],
          forwarded_to: plan.node,
        });
        return reply;
      }
      case "local":
        if (isNewWork(request.method, path)) cluster.assertJoined(`${request.method} ${path.split("?")[0]}`);
        return;
    }
  });

  // A new tag is claimed cluster-wide before the route writes anything under it.
  app.addHook("preHandler", async (request) => {
    const cluster = ctx.cluster;
    if (!cluster) return;
    const tag = tagCreatedBy(request.method, request.routeOptions.url, request.body);
    if (!tag) return;
    if ((await cluster.tags.claim(tag)) === "claimed") request.claimedTag = tag;
  });

  // What runs here changed: the catalog says so before the answer leaves (a fork's children are reachable from any node at once).
  app.addHook("onSend", async (request, _reply, payload) => {
    const cluster = ctx.cluster;
    if (cluster && changesSandboxes(request.method, request.url)) {
      await cluster
        .syncCatalog()
        .catch((err: Error) => log(`forkd cluster: catalog not updated yet (next heartbeat retries): ${err.message}`));
    }
    return payload;
  });

  app.addHook("onResponse", async (request, reply) => {
    const cluster = ctx.cluster;
    if (!cluster) return;
    const failed = reply.statusCode >= 400;
    const release: string[] = [];
    if (request.claimedTag && failed) release.push(request.claimedTag);
    // A snapshot removed here gives its tag back (another node's claim is never touched).
    if (request.method === "DELETE" && request.routeOptions.url === "/v1/snapshots/:tag" && !failed) {
      release.push(...(request.touched?.snapshots ?? []));
    }
    for (const tag of release) {
      await cluster.tags.release(tag).catch((err: Error) => log(`forkd cluster: tag ${tag} still claimed: ${err.message}`));
    }
  });
}
