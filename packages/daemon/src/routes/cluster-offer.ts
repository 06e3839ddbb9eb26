// A node's offer for a fork of one tag, asked by the node placing a fork over the
// cluster just before it plans: what this node holds of the tag (its locality) and
// how many children its admission would let in now. Answered from this node's own
// store and ledger; nothing is reserved (the fork itself is admitted when it comes).
import { ForkdError, validateName } from "@forkd/core";
import { z } from "zod";
import { localOffer } from "../cluster-spread.js";
import type { RouteDeps } from "./context.js";

const OfferQuery = z
  .object({
    tag: z.string(),
    /** The tag's guest memory (sizes it where this node does not hold it). */
    memory_mib: z.coerce.number().int().min(1).max(65536),
    memory_limit_mib: z.coerce.number().int().min(1).optional(),
    /** The tag's ancestors, nearest first, comma-separated. */
    ancestors: z
      .string()
      .max(64 * 128)
      .optional(),
  })
  .strict();
const Offer = z.object({
  locality: z.enum(["hot_pool", "staged_live", "staged", "on_disk", "ancestor", "none"]),
  fits: z.number(),
});

export function registerClusterOfferRoutes({ r, ctx, err }: RouteDeps): void {
  r.get("/v1/cluster/offer", { schema: { hide: true, querystring: OfferQuery, response: { 200: Offer, ...err } } }, async (request) => {
    if (!ctx.cluster) throw new ForkdError("invalid_state", "this daemon is not part of a cluster");
    const q = request.query;
    const ancestors = (q.ancestors ?? "").split(",").filter(Boolean);
    if (ancestors.length > 64) throw new ForkdError("bad_request", "at most 64 ancestors");
    return localOffer(ctx, {
      tag: validateName(q.tag, "tag"),
      memoryMib: q.memory_mib,
      memoryLimitMib: q.memory_limit_mib,
      ancestors: ancestors.map((a) => validateName(a, "tag")),
    });
  });
}
