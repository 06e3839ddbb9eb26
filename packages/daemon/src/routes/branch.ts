// BRANCH a running sandbox into a new snapshot, within the daemon-wide cap.
import {
  admitBranch,
  apiPendingSnapshotView,
  apiSnapshotView,
  branches,
  ForkdError,
  getSandbox,
  getSnapshot,
  startBranch,
} from "@forkd/core";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerBranchRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.post(
    "/v1/sandboxes/:id/branch",
    { schema: { params: S.IdParam, body: S.BranchBody, response: { 201: S.Snapshot, 202: S.Snapshot, ...err } } },
    async (request, reply) => {
      // Refused before any admission is taken when the source's state allows no capture.
      const source = getSandbox(request.params.id, "capture");
      const body = request.body;
      if (body.mode && (body.diff || body.live)) {
        throw new ForkdError("bad_request", "send either `mode` or the older `diff`/`live` flags, not both");
      }
      if (body.diff && body.live) throw new ForkdError("bad_request", "`diff` and `live` are two modes: send one (or `mode`)");
      const mode = body.mode ?? (body.live ? "live" : body.diff ? "diff" : undefined);
      if (body.parent_tag && body.parent_tag !== source.tag) {
        throw new ForkdError(
          "bad_request",
          `parent_tag '${body.parent_tag}' is not ${request.params.id}'s snapshot (${source.tag ?? "none"}); a BRANCH is always a layer on the snapshot its source was forked from`,
        );
      }
      // A slot under --max-branches and room for the capture: held until the snapshot is written (or failed).
      const ticket = await admitBranch(ctx.admission, source.memory_mib);
      ctx.metrics.branchesInFlight.inc();
      let started: Awaited<ReturnType<typeof startBranch>>;
      try {
        started = await startBranch(request.params.id, { ...(body.tag ? { tag: body.tag } : {}), ...(mode ? { mode } : {}) });
      } catch (e) {
        ticket.release();
        ctx.metrics.branchesInFlight.dec();
        throw e;
      }
      touch(request, "snapshots", started.status.tag);
      ctx.metrics.branchPauseSeconds.labels(started.status.mode).observe(started.status.pause_ms / 1000);
      const done = started.done.finally(() => {
        ticket.release();
        ctx.metrics.branchesInFlight.dec();
      });
      if (body.wait === false) {
        done.catch(() => {});
        const pending = branches.get(started.status.tag);
        return reply.code(202).send({
          ...(pending
            ? apiPendingSnapshotView(pending)
            : { tag: started.status.tag, dir: "", created_at_unix: 0, status: "writing" as const }),
          mode: started.status.mode,
          pause_ms: Math.round(started.status.pause_ms),
          parent: started.status.parent,
          total_ms: null,
        });
      }
      const finished = await done;
      if (finished.status === "failed") throw new ForkdError("vm_start_failed", `BRANCH failed: ${finished.error}`, { tag: finished.tag });
      return reply.code(201).send({ ...apiSnapshotView(await getSnapshot(finished.tag)), total_ms: finished.total_ms });
    },
  );
}
