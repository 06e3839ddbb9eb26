// Health, version, metrics and the OpenAPI document.
import { chooseAccel } from "@forkd/core";
import { e2bApiKey } from "@forkd/e2b";
import * as S from "../schemas.js";
import { FORKD_VERSION } from "../version.js";
import type { RouteDeps } from "./context.js";

export function registerSystemRoutes({ app, r, ctx, err }: RouteDeps): void {
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
  r.get("/v1/e2b/env", { schema: { response: { 200: S.E2bEnv, ...err } } }, async () => ({
    api_url: ctx.e2b.tcpUrl ?? null,
    api_key: e2bApiKey(ctx.token),
  }));
  r.get("/v1/openapi.json", { schema: { hide: true } }, async () => app.swagger());
}
