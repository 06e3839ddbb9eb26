// envd's plane (Connect protocol: process.Process, filesystem.Filesystem; REST
// /health and /files). Filled in by the envd work; the dispatch in planes.ts
// registers it inside its own encapsulated context, where every route only matches
// a request that carries E2b-Sandbox-Id.
import type { FastifyInstance } from "fastify";
import type { E2bContext } from "../context.js";

export type EnvdPlaneDeps = {
  e2b: E2bContext;
};

/**
 * Register envd's routes on `app` (an encapsulated context: its hooks, content-type
 * parsers and error handler stay inside). The sandbox is `request.headers["e2b-sandbox-id"]`;
 * look it up with `deps.e2b.sandboxes.get(id)`, check `X-Access-Token` against its
 * `envdAccessToken`, and reach its guest through `deps.e2b.agents.forSandbox(record.forkdId)`.
 */
export function registerEnvdPlane(_app: FastifyInstance, _deps: EnvdPlaneDeps): void {}
