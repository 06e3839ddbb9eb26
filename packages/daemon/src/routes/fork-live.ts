// Live fork-to-many: one call, N children of a running sandbox, the source paused
// only while the pages it wrote are copied, then registered as a snapshot in the background.
import {
  addNeeds,
  admit,
  branchesBySource,
  ForkdError,
  forkLive,
  forkNeeds,
  getSandbox,
  killSandbox,
  validateForkCount,
} from "@forkd/core";
import { boundedTimeout } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";
import { restoredChildView } from "./sandboxes.js";

const MIB = 2 ** 20;

export function registerForkLiveRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.post(
    "/v1/sandboxes/:id/fork",
    { schema: { params: S.IdParam, body: S.ForkLiveBody, response: { 201: S.ForkLiveResponse, ...err } } },
    async (request, reply) => {
      const body = request.body;
      const n = validateForkCount(body.n ?? 1);
      const ttlMs = boundedTimeout(body.timeout_ms, "timeout_ms", "sandbox");
      const source = getSandbox(request.params.id);
      const guest = source.memory_mib * MIB;
      // N children, plus the capture: its pages while copied, then its memory image on shmem until registered.
      const ticket = await admit(
        ctx.admission,
        addNeeds(forkNeeds({ n, guestMemoryBytes: guest, unstagedBytes: 0, dirtyFraction: ctx.admission.limits.dirtyFraction }), {
          memoryBytes: guest,
          shmBytes: guest,
          sandboxes: 0,
          branches: 1,
          why: "",
        }),
      );
      let result: Awaited<ReturnType<typeof forkLive>>;
      try {
        result = await ctx.hotPools.userFork(() =>
          forkLive(request.params.id, {
            n,
            ...(body.tag ? { tag: body.tag } : {}),
            ...(ttlMs !== undefined ? { ttlMs } : {}),
            ...(body.metadata ? { metadata: body.metadata } : {}),
            concurrency: 4,
            keepAgent: (id, agent) => ctx.pool.adopt(id, agent),
            onChild: (child) => {
              if (child.ok) ctx.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
            },
          }),
        );
      } catch (e) {
        ticket.release();
        throw e;
      }
      touch(request, "snapshots", result.tag);
      for (const child of result.children) touch(request, "sandboxes", child.id);
      ctx.metrics.branchPauseSeconds.labels("live").observe(result.pauseMs / 1000);
      ctx.metrics.forkLiveSeconds.observe(result.captureReadyMs / 1000);
      const failed = result.children.filter((c) => !c.ok);
      if (failed.length > 0) {
        // All or nothing, as a fork: the children that did start are killed and the capture dropped.
        for (const child of result.children) {
          if (!child.ok) continue;
          ctx.pool.drop(child.id);
          await killSandbox(child.id).catch(() => {});
        }
        await result.discard().finally(ticket.release);
        const first = failed[0]!;
        throw new ForkdError(
          "vm_start_failed",
          `${failed.length} of ${n} children could not be restored, so none were kept: ${first.ok ? "" : first.error.message}`,
          { failures: failed.map((c) => (c.ok ? null : { id: c.id, ...c.error })) },
        );
      }
      // The durable snapshot is written after the answer, off the children's path.
      result
        .register()
        .catch((e: Error) => request.log.warn(`registering live fork capture ${result.tag} failed: ${e.message}`))
        .finally(ticket.release);
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
