// The REST API v1. Every route validates with the zod schemas in schemas.ts,
// every failure leaves as {"error":{code,message}} with the status from core's
// one error table, and every request is audited (never with its headers).

import swagger from "@fastify/swagger";
import type { ErrorCode } from "@forkd/core";
import { e2bCredentialVerdict, isE2bRequest, registerE2bPlanes, sendE2bError } from "@forkd/e2b";
import Fastify, { type FastifyError, type FastifyInstance, type FastifyRequest } from "fastify";
import { jsonSchemaTransform, serializerCompiler, validatorCompiler, type ZodTypeProvider } from "fastify-type-provider-zod";
import { describeCall } from "./audit.js";
import { bearer, tokenMatches } from "./auth.js";
import { clusterTokenOf, isForwarded, registerClusterHooks } from "./cluster-hooks.js";
import { BODY_LIMIT_BYTES, classify, errorBody } from "./http-errors.js";
import { registerAgentCallRoutes } from "./routes/agent-calls.js";
import { registerBranchRoutes } from "./routes/branch.js";
import { registerClusterRoutes } from "./routes/cluster.js";
import { registerClusterOfferRoutes } from "./routes/cluster-offer.js";
import { ERROR_RESPONSES, type RouteDeps, type ServerContext, touch } from "./routes/context.js";
import { registerEventRoutes } from "./routes/events.js";
import { registerForkLiveRoutes } from "./routes/fork-live.js";
import { registerJobRoutes } from "./routes/jobs.js";
import { registerPoolRoutes } from "./routes/pools.js";
import { registerProcessRoutes } from "./routes/processes.js";
import { registerRegistryRoutes } from "./routes/registry.js";
import { registerSandboxRoutes } from "./routes/sandboxes.js";
import { registerSnapshotRoutes } from "./routes/snapshots.js";
import { registerSystemRoutes } from "./routes/system.js";
import { isUiPath, registerUiRoutes } from "./routes/ui.js";
import { registerWorkspaceRoutes } from "./routes/workspaces.js";

export type { ServerContext } from "./routes/context.js";

import { FORKD_VERSION } from "./version.js";

export { FORKD_VERSION };

declare module "fastify" {
  interface FastifyRequest {
    touched?: { sandboxes: Set<string>; snapshots: Set<string> };
    errorCode?: ErrorCode;
  }
}

export type ServerOpts = {
  https?: { cert: Buffer; key: Buffer };
  /**
   * The unix socket (0600, root's) needs no token: its permissions are the
   * credential, as with Docker's. TCP always needs one.
   */
  requireToken: boolean;
};

export async function buildServer(ctx: ServerContext, opts: ServerOpts = { requireToken: true }): Promise<FastifyInstance> {
  const app = Fastify({
    bodyLimit: BODY_LIMIT_BYTES,
    logger: false,
    ...(opts.https ? { https: opts.https } : {}),
  }) as unknown as FastifyInstance;
  // The API speaks JSON only: anything else is a 415, not a string body that fails the schema.
  app.removeContentTypeParser("text/plain");
  // forkd's clients send Content-Type: application/json with an empty body on calls
  // that take none (ping): an empty body is no body, not a parse error.
  app.removeContentTypeParser("application/json");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (_request, body, done) => {
    const text = String(body);
    if (text.trim() === "") return done(null, undefined);
    try {
      done(null, JSON.parse(text));
    } catch (err) {
      const e = new Error(`the body is not valid JSON: ${(err as Error).message}`) as Error & { statusCode: number; code: string };
      e.statusCode = 400;
      e.code = "FST_ERR_CTP_INVALID_JSON_BODY";
      done(e, undefined);
    }
  });
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);
  await app.register(swagger, {
    openapi: {
      openapi: "3.0.3",
      info: { title: "forkd API", version: FORKD_VERSION, description: "microVM sandboxes: warm snapshots, copy-on-write fork" },
      components: { securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
  });

  app.addHook("onRequest", async (request, reply) => {
    (request as FastifyRequest & { startedAt: number }).startedAt = performance.now();
    // The dashboard's static files hold no secret: the page logs in with the token itself.
    if (request.url === "/healthz" || isUiPath(request.url)) return;
    // A node-to-node call (cluster) carries the cluster secret instead of a client's token, on any listener.
    if (ctx.cluster && isForwarded(request)) {
      if (tokenMatches(ctx.cluster.token, clusterTokenOf(request))) return;
      request.errorCode = "unauthorized";
      await reply.code(401).send(errorBody("unauthorized", "a forwarded call without the right cluster token"));
      return reply;
    }
    if (!opts.requireToken) return;
    const verdict = e2bCredentialVerdict(ctx.token, request, tokenMatches(ctx.token, bearer(request.headers.authorization)));
    if (verdict !== "refused") return;
    request.errorCode = "unauthorized";
    if (isE2bRequest(request)) {
      await sendE2bError(reply, 401, 'missing or invalid API key: send X-API-Key: e2b_… (eval "$(forkd e2b env)" sets E2B_API_KEY)');
    } else {
      await reply
        .code(401)
        .header("www-authenticate", 'Bearer realm="forkd"')
        .send(errorBody("unauthorized", "missing or wrong bearer token: send Authorization: Bearer <token>"));
    }
  });

  app.addHook("onResponse", async (request, reply) => {
    const started = (request as FastifyRequest & { startedAt?: number }).startedAt ?? performance.now();
    const params = request.params as Record<string, string> | undefined;
    touch(request, "sandboxes", params?.id);
    touch(request, "snapshots", params?.tag);
    ctx.audit.write({
      ts: new Date().toISOString(),
      method: request.method,
      path: request.url.split("?")[0] ?? request.url,
      status: reply.statusCode,
      latency_ms: Math.round((performance.now() - started) * 100) / 100,
      remote: request.ip ?? request.socket.remoteAddress ?? "unix",
      user_agent: String(request.headers["user-agent"] ?? ""),
      ...(request.touched?.sandboxes.size ? { sandboxes: [...request.touched.sandboxes] } : {}),
      ...(request.touched?.snapshots.size ? { snapshots: [...request.touched.snapshots] } : {}),
      ...(request.errorCode ? { error_code: request.errorCode } : {}),
      ...describeCall(request.routeOptions.url, request.body),
    });
  });

  app.setErrorHandler((err: FastifyError, request, reply) => {
    const c = classify(err);
    request.errorCode = c.code;
    if (c.status >= 500) request.log.error(err);
    // A refusal over a limit says when to come back (RFC 9110 Retry-After, seconds).
    if (c.code === "over_limit") void reply.header("retry-after", String(Number(c.details?.retry_after_s) || 5));
    void reply.code(c.status).send(errorBody(c.code, c.message, c.details));
  });
  app.setNotFoundHandler((request, reply) => {
    request.errorCode = "not_found";
    if (isE2bRequest(request)) return void sendE2bError(reply, 404, `no route ${request.method} ${request.url.split("?")[0]}`);
    void reply.code(404).send(errorBody("not_found", `no route ${request.method} ${request.url.split("?")[0]}; see GET /v1/openapi.json`));
  });

  registerClusterHooks(app, ctx);

  const deps: RouteDeps = {
    app,
    r: app.withTypeProvider<ZodTypeProvider>(),
    ctx,
    err: ERROR_RESPONSES,
    touch,
    confinePackPaths: opts.requireToken,
  };
  for (const register of [
    registerSystemRoutes,
    registerSnapshotRoutes,
    registerSandboxRoutes,
    registerBranchRoutes,
    registerAgentCallRoutes,
    registerProcessRoutes,
    registerJobRoutes,
    registerPoolRoutes,
    registerForkLiveRoutes,
    registerWorkspaceRoutes,
    registerRegistryRoutes,
    registerClusterRoutes,
    registerEventRoutes,
    registerUiRoutes,
    registerClusterOfferRoutes,
  ]) {
    register(deps);
  }
  await registerE2bPlanes(app, ctx.e2b);
  return app;
}
