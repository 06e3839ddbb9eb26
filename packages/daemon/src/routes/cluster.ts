// The cluster as this node sees it: the live nodes (capacity, load, what each
// holds), and drain/undrain of a node (no new work is placed there; what runs stays).
import { validateNodeName } from "@forkd/cluster";
import { ForkdError } from "@forkd/core";
import * as S from "../schemas.js";
import type { RouteDeps, ServerContext } from "./context.js";

/**
 * A daemon started without --cluster has no nodes to list or drain: the request is
 * well formed but this daemon's state refuses it (409, like any call in the wrong
 * state), not a server failure.
 */
function clusterOf(ctx: ServerContext) {
  if (!ctx.cluster) {
    throw new ForkdError(
      "invalid_state",
      "this daemon is not part of a cluster: start it with --cluster etcd://HOST:PORT --node-name NAME",
    );
  }
  return ctx.cluster;
}

export function registerClusterRoutes({ r, ctx, err }: RouteDeps): void {
  const err503 = { ...err, 503: S.ErrorBody };
  r.get("/v1/cluster/nodes", { schema: { response: { 200: S.ClusterNodeList, ...err503 } } }, async () => {
    const cluster = clusterOf(ctx);
    return (await cluster.nodes()).map((n) => ({ ...n, self: n.name === cluster.name }));
  });
  for (const [method, draining] of [
    ["POST", true],
    ["DELETE", false],
  ] as const) {
    r.route({
      method,
      url: "/v1/cluster/nodes/:name/drain",
      schema: { params: S.NameParam, response: { 200: S.DrainResult, ...err503 } },
      handler: async (request) => {
        const cluster = clusterOf(ctx);
        const name = validateNodeName(request.params.name);
        await cluster.setDraining(name, draining);
        return { name, draining };
      },
    });
  }
}
