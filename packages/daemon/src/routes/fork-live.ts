// Live fork-to-many: one call, N children of a running sandbox, the source paused
// only while the pages it wrote are copied, then registered as a snapshot in the background.
import {
  branchesBySource,
  ForkdError,
  forkAllOrNothing,
  forkLiveAllOrNothing,
  getSandbox,
  removeSnapshot,
  restoredChildView,
  validateForkCount,
} from "@forkd/core";
import { liveForkShare, spreadLiveFork } from "../cluster-spread.js";
import { boundedTimeout } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";
import { daemonForkSteps } from "./fork-steps.js";

export function registerForkLiveRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.post(
    "/v1/sandboxes/:id/fork",
    { schema: { params: S.IdParam, body: S.ForkLiveBody, response: { 201: S.ForkLiveResponse, ...err } } },
    async (request, reply) => {
      const body = request.body;
      const ttlMs = boundedTimeout(body.timeout_ms, "timeout_ms", "sandbox");
      const n = validateForkCount(body.n ?? 1);
      const cluster = ctx.cluster;
      // In a cluster, more children than the source's node has room for spread over the other nodes.
      const sourceTag = cluster ? getSandbox(request.params.id).tag : null;
      const ownerN = cluster && sourceTag ? await liveForkShare(ctx, cluster.name, sourceTag, n) : n;
      let tag = body.tag;
      if (cluster && ownerN < n && !tag) {
        // The capture's tag travels to other nodes: claimed cluster-wide before it exists.
        tag = `${sourceTag}-live-${Date.now().toString(36)}`;
        await cluster.tags.claim(tag);
      }
      const steps = daemonForkSteps(ctx, (child) => touch(request, "sandboxes", child.id));
      const claimedHere = tag !== undefined && tag !== body.tag;
      const result = await forkLiveAllOrNothing(request.params.id, {
        n: ownerN,
        ...(tag ? { tag } : {}),
        ttlMs,
        metadata: body.metadata,
        concurrency: 4,
        ...steps,
      }).catch(async (err: unknown) => {
        if (cluster && claimedHere) await cluster.tags.release(tag!).catch(() => {});
        throw err;
      });
      let spread: Awaited<ReturnType<typeof spreadLiveFork>> | undefined;
      if (cluster && ownerN < n) {
        try {
          // The layer must be registered before it can be pushed: the others restore from it.
          await result.register();
          spread = await spreadLiveFork({
            ctx,
            cluster,
            tag: result.tag,
            rest: n - ownerN,
            ownerN,
            body: { ...(ttlMs !== undefined ? { timeout_ms: ttlMs } : {}), ...(body.metadata ? { metadata: body.metadata } : {}) },
            forkHere: async (count) =>
              (await forkAllOrNothing({ tag: result.tag, n: count, ttlMs, metadata: body.metadata, ...steps })).map((c) => ({
                ...restoredChildView(c, branchesBySource()),
                node: cluster.name,
              })),
            killHere: steps.killChild,
          });
        } catch (err) {
          // All or nothing across the cluster: the owner's share goes too, and the capture with it.
          for (const c of result.children) await steps.killChild(c.id).catch(() => {});
          await removeSnapshot(result.tag, { force: true }).catch(() => {});
          if (claimedHere) await cluster.tags.release(result.tag).catch(() => {});
          throw err instanceof ForkdError ? err : new ForkdError("internal", (err as Error).message);
        }
      }
      touch(request, "snapshots", result.tag);
      ctx.metrics.branchPauseSeconds.labels("live").observe(result.pauseMs / 1000);
      ctx.metrics.forkLiveSeconds.observe(result.captureReadyMs / 1000);
      // The durable snapshot is written after the answer, off the children's path (a spread registered it already).
      if (!spread)
        result.register().catch((e: Error) => request.log.warn(`registering live fork capture ${result.tag} failed: ${e.message}`));
      const bySource = branchesBySource();
      const startedAt = (request as typeof request & { startedAt?: number }).startedAt ?? performance.now();
      return reply.code(201).send({
        tag: result.tag,
        source_id: result.sourceId,
        source_pause_ms: result.pauseMs,
        capture_ready_ms: result.captureReadyAt - startedAt,
        total_ms: performance.now() - startedAt,
        captured_pages: result.capturedPages,
        sandboxes: [
          ...result.children.map((c) => ({ ...restoredChildView(c, bySource), ...(cluster ? { node: cluster.name } : {}) })),
          ...((spread?.children ?? []) as S.SandboxT[]),
        ],
        ...(spread ? { spread: spread.report } : {}),
      });
    },
  );
}
