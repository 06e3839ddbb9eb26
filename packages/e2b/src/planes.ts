// One listener, three planes: forkd's own routes (/v1/*, /healthz, /version,
// /metrics) stay as they are; a request carrying `E2b-Sandbox-Id` goes to that
// sandbox's envd plane (the SDK sends it on every envd call, with E2B_SANDBOX_URL
// pointing at this port); everything else is E2B's control plane. Each E2B plane is
// an encapsulated Fastify context with its own credential check and error shape.
import type { IncomingHttpHeaders } from "node:http";
import type { FastifyInstance } from "fastify";
import { e2bKeyMatches } from "./api-key.js";
import type { E2bContext } from "./context.js";
import { registerControlPlane } from "./control/routes.js";
import { registerEnvdPlane } from "./envd/index.js";
import { e2bErrorOf, sendE2bError } from "./errors.js";

/** The header that marks an envd request (lower case: Node's spelling). */
const E2B_SANDBOX_ID_HEADER = "e2b-sandbox-id";

/** E2B's control-plane resources (api.e2b.app); forkd's own routes (/v1/*, /healthz, /version, /metrics) are none of them. */
/**
 * A signed `/files` URL (`sandbox.downloadUrl()`/`uploadUrl()`): the SDK builds it from
 * E2B_SANDBOX_URL alone and it is fetched with no header at all, so its signature is its
 * credential and names the sandbox; the envd plane checks both.
 */
const SIGNED_FILES_URL = /^\/files\?(?:[^#]*&)?signature=v1_/;

/** An envd request: it names its sandbox by header, or is a signed /files URL. */
function isEnvdRequest(request: { url?: string; headers: IncomingHttpHeaders }): boolean {
  return request.headers[E2B_SANDBOX_ID_HEADER] !== undefined || SIGNED_FILES_URL.test(request.url ?? "");
}

const E2B_CONTROL_PATH = /^\/(?:v[2-9]\/)?(?:sandboxes|snapshots|templates|volumes|secrets|teams|access-tokens|api-keys)(?:[/?]|$)/;

/** Whether the E2B planes answer this request (and their error shape is E2B's) rather than forkd's API. */
export function isE2bRequest(request: { url: string; headers: IncomingHttpHeaders }): boolean {
  return isEnvdRequest(request) || E2B_CONTROL_PATH.test(request.url);
}

/**
 * The credential check of the daemon's TCP port for one request: the bearer token
 * everywhere; on E2B's control plane also E2B's key (`X-API-Key: e2b_…`). An envd
 * request (it carries E2b-Sandbox-Id and can match envd's routes only) is checked
 * by the envd plane against the sandbox's access token instead.
 */
export function e2bCredentialVerdict(
  token: string,
  request: { url: string; headers: IncomingHttpHeaders },
  bearerOk: boolean,
): "ok" | "envd-checks" | "refused" {
  if (isEnvdRequest(request)) return "envd-checks";
  if (bearerOk) return "ok";
  const key = request.headers["x-api-key"];
  return E2B_CONTROL_PATH.test(request.url) && e2bKeyMatches(token, typeof key === "string" ? key : undefined) ? "ok" : "refused";
}

/**
 * A header-carrying request may match envd's routes only (mustMatchWhenDerived):
 * it never falls through to an unconstrained route, so the envd plane's own
 * credential (the sandbox's access token) cannot open forkd's /v1 API or the
 * control plane.
 */
const envdPlaneConstraint = {
  name: "e2bPlane",
  mustMatchWhenDerived: true,
  storage() {
    const handlers = new Map<string, unknown>();
    return {
      get: (value: string) => (handlers.get(value) ?? null) as never,
      set: (value: string, handler: unknown) => {
        handlers.set(value, handler);
      },
    };
  },
  deriveConstraint: (request: { url?: string; headers: IncomingHttpHeaders }) => (isEnvdRequest(request) ? "envd" : undefined),
};

export async function registerE2bPlanes(app: FastifyInstance, e2b: E2bContext): Promise<void> {
  app.addConstraintStrategy(envdPlaneConstraint as unknown as Parameters<FastifyInstance["addConstraintStrategy"]>[0]);
  await app.register(async (envd) => {
    envd.addHook("onRoute", (route) => {
      route.constraints = { ...route.constraints, e2bPlane: "envd" };
    });
    registerEnvdPlane(envd, { e2b });
  });
  await app.register(async (control) => {
    control.setErrorHandler((err, request, reply) => {
      const e = e2bErrorOf(err);
      if (e.status >= 500) e2b.log(`${request.method} ${request.url.split("?")[0]}: ${(err as Error).message}`);
      void sendE2bError(reply, e.status, e.message, e.retryAfterS);
    });
    registerControlPlane(control, { e2b });
  });
}
