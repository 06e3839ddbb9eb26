// The event stream (server-sent events) and the metrics summary the dashboard charts.
import { apiPendingSnapshotView, apiSandboxView, branches, branchesBySource, ForkdError, listSandboxes, listSnapshots } from "@forkd/core";
import type { StateSample } from "../events.js";
import type { HotPools } from "../hot-pools.js";
import type { JobRegistry } from "../jobs.js";
import * as S from "../schemas.js";
import { metricsSummary } from "../usage.js";
import type { RouteDeps } from "./context.js";

/** The state the event watcher compares: what the list routes answer. */
export async function sampleState(hotPools: HotPools, jobs: JobRegistry): Promise<StateSample> {
  const bySource = branchesBySource();
  const sample: StateSample = { sandboxes: new Map(), snapshots: new Map(), pools: "", poolList: [], jobs: new Map() };
  for (const s of listSandboxes()) {
    if (s.pool) continue;
    const view = apiSandboxView(s, bySource);
    sample.sandboxes.set(s.id, { health: view.health, health_reason: view.health_reason, view });
  }
  for (const snap of await listSnapshots())
    sample.snapshots.set(snap.tag, { status: "ready", error: null, view: { tag: snap.tag, status: "ready" } });
  for (const b of branches.list()) {
    if (b.status === "ready" || sample.snapshots.has(b.tag)) continue;
    sample.snapshots.set(b.tag, { status: b.status, error: b.error, view: { ...apiPendingSnapshotView(b) } });
  }
  sample.poolList = hotPools.list();
  sample.pools = JSON.stringify(sample.poolList);
  for (const j of jobs.list()) sample.jobs.set(j.id, { key: `${j.status} ${j.progress.done_bytes} ${j.progress.step}`, view: { ...j } });
  return sample;
}

export function registerEventRoutes({ r, ctx, err }: RouteDeps): void {
  r.get(
    "/v1/events",
    {
      schema: {
        description:
          "Server-sent events: hello, sandbox.started|killed|unhealthy, snapshot.writing|ready|failed|removed, pool.sizes, job.progress, metrics. A client whose unread backlog passes 256 KiB is dropped.",
        response: { ...err },
      },
    },
    async (request, reply) => {
      if (!ctx.events.hasRoom())
        throw new ForkdError("over_limit", "too many event-stream clients; close one and retry", { retry_after_s: 5 });
      const current = await ctx.watcher.current();
      reply.hijack();
      ctx.events.attach(reply.raw, [{ type: "hello", data: { sandboxes: current.sandboxes.size, snapshots: current.snapshots.size } }]);
      request.log.debug("event stream opened");
    },
  );
  r.get("/v1/metrics/summary", { schema: { response: { 200: S.MetricsSummary, ...err } } }, async () =>
    metricsSummary({ spawns: ctx.spawns, poolClaims: ctx.poolClaims }, ctx.admission),
  );
}
