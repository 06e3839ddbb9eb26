// Snapshots: list (with BRANCHes still writing or failed), status, create warm, show, remove.
import {
  admitSnapshot,
  apiPendingSnapshotView,
  apiSnapshotView,
  branches,
  compactSnapshot,
  createSnapshot,
  ForkdError,
  getSnapshot,
  isForkdError,
  listSnapshots,
  removeSnapshot,
  snapshotDetails,
  validateName,
  validateResources,
} from "@forkd/core";
import { z } from "zod";
import { isForwarded } from "../cluster-hooks.js";
import { removeEverywhere } from "../cluster-wide.js";
import { boundedTimeout } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerSnapshotRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/snapshots", { schema: { response: { 200: S.SnapshotList, ...err } } }, async () => {
    const ready = await listSnapshots();
    const readyTags = new Set(ready.map((snap) => snap.tag));
    // As forkd does: ready snapshots, then BRANCHes still writing (and ones that failed).
    return [
      ...ready.map(apiSnapshotView),
      ...branches
        .list()
        .filter((b) => b.status !== "ready" && !readyTags.has(b.tag))
        .map(apiPendingSnapshotView),
    ];
  });
  r.get("/v1/snapshots/:tag/status", { schema: { params: S.TagParam, response: { 200: S.SnapshotStatus, ...err } } }, async (request) => {
    const tag = validateName(request.params.tag, "tag");
    const branch = branches.get(tag);
    const ready = await getSnapshot(tag).catch(() => undefined);
    if (!ready && !branch) throw new ForkdError("snapshot_not_found", `no snapshot ${tag}; \`forkd images\` lists them`, { tag });
    return {
      tag,
      status: ready ? ("ready" as const) : (branch!.status as "writing" | "failed"),
      error: branch?.error ?? null,
      pause_ms: branch?.pause_ms ?? null,
      total_ms: branch?.total_ms ?? null,
      branched_from: ready?.branchedFrom ?? branch?.source_id ?? null,
    };
  });
  r.post("/v1/snapshots", { schema: { body: S.CreateSnapshotBody, response: { 201: S.Snapshot, ...err } } }, async (request, reply) => {
    const body = request.body;
    touch(request, "snapshots", body.tag);
    boundedTimeout(body.boot_wait_secs, "boot_wait_secs", "bootWait");
    const memoryMib = body.memory_mib ?? 256;
    validateResources(memoryMib, body.vcpus ?? 1);
    if (await getSnapshot(body.tag).catch(() => undefined)) {
      // forkd answers an existing tag with 400 (DELETE first), not 409.
      throw new ForkdError(
        "bad_request",
        `snapshot ${body.tag} already exists; DELETE /v1/snapshots/${body.tag} first or pick another tag`,
        {
          tag: body.tag,
        },
      );
    }
    // The parent's RAM is a file on shmem that may fill to memory_mib: room for it is held until it is registered.
    const ticket = await admitSnapshot(ctx.admission, memoryMib);
    const snapshot = await createSnapshot({
      tag: body.tag,
      image: body.image,
      warm: body.warm,
      warmEval: body.warm_eval,
      memoryMib: body.memory_mib,
      vcpus: body.vcpus,
    }).finally(ticket.release);
    return reply.code(201).send(apiSnapshotView(snapshot));
  });
  r.get("/v1/snapshots/:tag", { schema: { params: S.TagParam, response: { 200: S.Snapshot, ...err } } }, async (request) =>
    apiSnapshotView(await getSnapshot(request.params.tag)),
  );
  r.delete(
    "/v1/snapshots/:tag",
    {
      schema: {
        params: S.TagParam,
        querystring: z.object({ force: z.enum(["true", "false"]).optional(), cascade: z.enum(["true", "false"]).optional() }).strict(),
        response: { 204: z.null(), ...err },
      },
    },
    async (request, reply) => {
      const here = async () => {
        const { killed, removed } = await removeSnapshot(request.params.tag, {
          force: request.query.force === "true",
          cascade: request.query.cascade === "true",
        });
        for (const tag of removed) touch(request, "snapshots", tag);
        for (const id of killed) {
          ctx.agents.drop(id);
          touch(request, "sandboxes", id);
        }
      };
      // In a cluster, rmi removes the tag from every node that holds it.
      if (ctx.cluster && !isForwarded(request)) {
        const query = new URLSearchParams(request.query as Record<string, string>).toString();
        await removeEverywhere({
          cluster: ctx.cluster,
          tag: request.params.tag,
          query: query ? `?${query}` : "",
          here: () =>
            here().then(
              () => true,
              (err: unknown) => {
                if (isForkdError(err, "not_found")) return false;
                throw err;
              },
            ),
        });
        touch(request, "snapshots", request.params.tag);
        return reply.code(204).send(null);
      }
      await here();
      return reply.code(204).send(null);
    },
  );
  r.get("/v1/snapshots/:tag/info", { schema: { params: S.TagParam, response: { 200: S.SnapshotInfo, ...err } } }, async (request) =>
    snapshotDetails(request.params.tag),
  );
  r.post(
    "/v1/snapshots/:tag/compact",
    { schema: { params: S.TagParam, body: S.CompactBody, response: { 200: S.Snapshot, ...err } } },
    async (request, reply) => {
      touch(request, "snapshots", request.body.to);
      if (request.body.to === request.params.tag) throw new ForkdError("bad_request", "compact target tag must differ from source tag");
      // The flat copy is written on shmem first, as a new snapshot's RAM is.
      const ticket = await admitSnapshot(ctx.admission, (await getSnapshot(request.params.tag)).memoryMib);
      const copy = apiSnapshotView(await compactSnapshot(request.params.tag, request.body.to).finally(ticket.release));
      return reply.code(200).send({ ...copy, branched_from: `compact:${request.params.tag}` });
    },
  );
}
