// Live fork-to-many: one call, N children of a running sandbox, the source paused
// only while the pages it wrote are copied, then registered as a snapshot in the background.
import { branchesBySource, forkLiveAllOrNothing, restoredChildView } from "@forkd/core";
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
      const result = await forkLiveAllOrNothing(request.params.id, {
        n: body.n ?? 1,
        ...(body.tag ? { tag: body.tag } : {}),
        ttlMs,
        metadata: body.metadata,
        concurrency: 4,
        ...daemonForkSteps(ctx, (child) => touch(request, "sandboxes", child.id)),
      });
      touch(request, "snapshots", result.tag);
      ctx.metrics.branchPauseSeconds.labels("live").observe(result.pauseMs / 1000);
      ctx.metrics.forkLiveSeconds.observe(result.captureReadyMs / 1000);
      // The durable snapshot is written after the answer, off the children's path.
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
        sandboxes: result.children.map((c) => restoredChildView(c, bySource)),
      });
    },
  );
}
