// Health, version, metrics and the OpenAPI document.
import { chooseAccel } from "@forkd/core";
import * as S from "../schemas.js";
import { FORKD_VERSION } from "../version.js";
import type { RouteDeps } from "./context.js";

export function registerSystemRoutes({ app, r, ctx }: RouteDeps): void {
  r.get("/healthz", { schema: { security: [], response: { 200: S.Health } } }, async () => ({ ok: true as const }));
  r.get("/version", { schema: { response: { 200: S.Version } } }, async () => ({
    version: FORKD_VERSION,
    api: "v1" as const,
    node: process.version,
    accel: (await chooseAccel()).accel,
  }));
  r.get("/metrics", { schema: { hide: true } }, async (_req, reply) => {
    void reply.header("content-type", ctx.metrics.registry.contentType);
    return ctx.metrics.registry.metrics();
  });
  r.get("/v1/openapi.json", { schema: { hide: true } }, async () => app.swagger());
}
