// BRANCH a running sandbox into a new snapshot, within the daemon-wide cap.
import { ForkdError, getSandbox, startBranch } from "@forkd/core";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

// Shared by the unix-socket and TCP servers of one daemon: the cap is per daemon.
let inFlightBranches = 0;

export function registerBranchRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.post(
    "/v1/sandboxes/:id/branch",
    { schema: { params: S.IdParam, body: S.BranchBody, response: { 201: S.BranchResponse, 202: S.BranchResponse, ...err } } },
    async (request, reply) => {
      getSandbox(request.params.id);
      if (inFlightBranches >= ctx.maxBranches) {
        throw new ForkdError("over_limit", `${inFlightBranches} BRANCHes are in progress, the limit is ${ctx.maxBranches}; retry shortly`);
      }
      inFlightBranches++;
      ctx.metrics.branchesInFlight.inc();
      let started: Awaited<ReturnType<typeof startBranch>>;
      try {
        started = await startBranch(request.params.id, { tag: request.body.tag, mode: request.body.mode });
      } catch (e) {
        inFlightBranches--;
        ctx.metrics.branchesInFlight.dec();
        throw e;
      }
      touch(request, "snapshots", started.status.tag);
      ctx.metrics.branchPauseSeconds.labels(started.status.mode).observe(started.status.pause_ms / 1000);
      const done = started.done.finally(() => {
        inFlightBranches--;
        ctx.metrics.branchesInFlight.dec();
      });
      if (request.body.wait === false) {
        done.catch(() => {});
        return reply.code(202).send(started.status);
      }
      const finished = await done;
      if (finished.status === "failed") throw new ForkdError("vm_start_failed", `BRANCH failed: ${finished.error}`, { tag: finished.tag });
      return reply.code(201).send(finished);
    },
  );
}
