// Sandboxes: list, fork from a snapshot, show, kill.
import {
  apiSandboxView,
  branchesBySource,
  claimedChildView,
  forkAllOrNothing,
  getSandbox,
  killSandbox,
  listSandboxes,
  poolCanServe,
  restoredChildView,
  validateForkCount,
  validateSandboxId,
} from "@forkd/core";
import { z } from "zod";
import { isForwarded } from "../cluster-hooks.js";
import { clusterFork } from "../cluster-spread.js";
import { boundedTimeout } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";
import { daemonForkSteps } from "./fork-steps.js";

export function registerSandboxRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/sandboxes", { schema: { querystring: S.ListSandboxesQuery, response: { 200: S.SandboxList, ...err } } }, async (request) => {
    const bySource = branchesBySource();
    // Pooled children are the daemon's, not yet anyone's: listed only when asked for.
    const all = request.query.pool === "true";
    return listSandboxes()
      .filter((s) => all || !s.pool)
      .map((s) => apiSandboxView(s, bySource));
  });
  r.post("/v1/sandboxes", { schema: { body: S.CreateSandboxesBody, response: { 201: S.ForkResult, ...err } } }, async (request, reply) => {
    const n = validateForkCount(request.body.n ?? 1);
    const opts = forkOptsOf(request.body, boundedTimeout(request.body.timeout_ms, "timeout_ms", "sandbox"));
    touch(request, "snapshots", opts.tag);
    /** This node's share: the snapshot's hot pool first (a pooled child is handed out in the time of an identity call), then restores. */
    const forkHere = async (count: number) => {
      const pooled = poolCanServe(opts) ? await ctx.hotPools.claim(opts.tag, count, { ttlMs: opts.ttlMs, metadata: opts.metadata }) : [];
      for (const c of pooled) touch(request, "sandboxes", c.id);
      const restored =
        pooled.length === count
          ? []
          : await forkAllOrNothing({
              ...opts,
              n: count - pooled.length,
              held: pooled.map((c) => c.id),
              ...daemonForkSteps(ctx, (child) => touch(request, "sandboxes", child.id)),
            });
      const bySource = branchesBySource();
      return [...pooled.map((c) => claimedChildView(c, bySource)), ...restored.map((c) => restoredChildView(c, bySource))];
    };
    // In a cluster, the node a client called spreads the fork; a node another node asked serves its share here.
    if (ctx.cluster && !isForwarded(request)) {
      const cluster = ctx.cluster;
      const { children } = await clusterFork({
        ctx,
        cluster,
        tag: opts.tag,
        n,
        memoryLimitMib: opts.memoryLimitMib,
        body: request.body,
        forkHere: async (count) => (await forkHere(count)).map((c) => ({ ...c, node: cluster.name })),
        killHere: (id) => daemonForkSteps(ctx, () => {}).killChild(id),
      });
      return reply.code(201).send(children as S.ForkResultT);
    }
    return reply.code(201).send(await forkHere(n));
  });
  r.get("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 200: S.Sandbox, ...err } } }, async (request) =>
    apiSandboxView(getSandbox(request.params.id)),
  );
  r.delete("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 204: z.null(), ...err } } }, async (request, reply) => {
    validateSandboxId(request.params.id);
    ctx.agents.drop(request.params.id);
    await killSandbox(request.params.id);
    // A pooled child killed by id leaves its pool short: refill it.
    ctx.hotPools.kick();
    return reply.code(204).send(null);
  });
}

/** A fork request's body as core's fork options (a pooled child must match them too). */
function forkOptsOf(body: S.CreateSandboxesBodyT, ttlMs: number | undefined) {
  return {
    tag: body.snapshot_tag,
    memoryLimitMib: body.memory_limit_mib ?? undefined,
    cpuLimit: body.cpu_limit,
    network: body.network,
    allowOut: body.allow_out,
    denyOut: body.deny_out,
    ttlMs,
    metadata: body.metadata,
  };
}
