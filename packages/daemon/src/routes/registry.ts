// Push and pull as jobs (202 at once, progress from GET /v1/jobs/:id): a snapshot
// chain to or from an OCI registry, a hub name, or a pack URL. Arguments are
// checked before the job starts, so a malformed one is a 400 naming the forms.
import { getSnapshot, pullSnapshot, pullSource, pushSnapshot, pushTarget } from "@forkd/core";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerRegistryRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.post(
    "/v1/snapshots/:tag/push",
    { schema: { params: S.TagParam, body: S.PushBody, response: { 202: S.Job, ...err } } },
    async (request, reply) => {
      const { tag } = request.params;
      pushTarget(tag, request.body.ref);
      await getSnapshot(tag);
      touch(request, "snapshots", tag);
      const job = ctx.jobs.start("push", async (progress) => pushSnapshot(tag, request.body.ref, { onProgress: progress }));
      return reply.code(202).send(job);
    },
  );
  r.post("/v1/snapshots/pull", { schema: { body: S.PullBody, response: { 202: S.Job, ...err } } }, async (request, reply) => {
    const { ref, tag, hub } = request.body;
    const opts = { ...(tag !== undefined ? { tag } : {}), ...(hub !== undefined ? { hub } : {}) };
    pullSource(ref, opts);
    touch(request, "snapshots", tag);
    const job = ctx.jobs.start("pull", async (progress) => pullSnapshot(ref, { ...opts, onProgress: progress }));
    return reply.code(202).send(job);
  });
}
