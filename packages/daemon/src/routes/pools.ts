// Hot pools: per snapshot, how many children the daemon keeps restored and answering.
import { validateName } from "@forkd/core";
import { z } from "zod";
import { isForwarded } from "../cluster-hooks.js";
import { setPoolEverywhere } from "../cluster-wide.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerPoolRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/pools", { schema: { response: { 200: S.PoolList, ...err } } }, async () => ctx.hotPools.list());
  r.get("/v1/snapshots/:tag/pool", { schema: { params: S.TagParam, response: { 200: S.Pool, ...err } } }, async (request) =>
    ctx.hotPools.get(validateName(request.params.tag, "tag")),
  );
  r.put(
    "/v1/snapshots/:tag/pool",
    { schema: { params: S.TagParam, body: S.PoolBody, response: { 200: S.Pool, ...err } } },
    async (request) => {
      const tag = validateName(request.params.tag, "tag");
      // In a cluster, the target is split over the nodes: each keeps its share (this node's answer shows its own).
      if (ctx.cluster && !isForwarded(request)) {
        let mine: S.PoolT | undefined;
        await setPoolEverywhere({
          cluster: ctx.cluster,
          tag,
          size: request.body.size,
          here: async (share) => {
            mine = await ctx.hotPools.set(tag, share);
          },
        });
        return mine ?? ctx.hotPools.get(tag);
      }
      return ctx.hotPools.set(tag, request.body.size);
    },
  );
  r.delete("/v1/snapshots/:tag/pool", { schema: { params: S.TagParam, response: { 204: z.null(), ...err } } }, async (request, reply) => {
    for (const id of await ctx.hotPools.remove(validateName(request.params.tag, "tag"))) touch(request, "sandboxes", id);
    return reply.code(204).send(null);
  });
}
