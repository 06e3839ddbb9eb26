// envd's plane on the daemon's port (Connect: process.Process, filesystem.Filesystem;
// REST: /health, /files), registered by planes.ts inside its own encapsulated
// context, where every route matches only a request that carries E2b-Sandbox-Id.
// The plane reads bodies itself (Connect envelopes, multipart and gzip uploads, as
// streams): this context keeps Fastify from reading them, and hands the raw request
// and response over.
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { E2bContext } from "../context.js";
import { stateOf } from "../sandboxes.js";
import type { EnvdDeps, EnvdSandbox } from "./context.js";
import { createEnvdPlane, type EnvdPlane } from "./plane.js";

export type EnvdPlaneDeps = {
  e2b: E2bContext;
};

const planes = new WeakMap<E2bContext, EnvdPlane>();

function envdDeps(e2b: E2bContext): EnvdDeps {
  const view = (id: string): EnvdSandbox | undefined => {
    const record = e2b.sandboxes.get(id);
    if (!record) return undefined;
    return {
      id: record.sandboxID,
      running: stateOf(record) === "running",
      ...(record.envdAccessToken ? { accessToken: record.envdAccessToken } : {}),
      envVars: record.envVars,
      memoryMib: record.memoryMB,
    };
  };
  return {
    sandbox: view,
    *securedSandboxes() {
      for (const record of e2b.sandboxes.list()) {
        const sandbox = record.envdAccessToken ? view(record.sandboxID) : undefined;
        if (sandbox) yield sandbox;
      }
    },
    agent: async (id) => {
      const record = e2b.sandboxes.get(id);
      if (!record?.forkdId) throw Object.assign(new Error(`sandbox ${id} is not running`), { code: "invalid_state" });
      return e2b.agents.forSandbox(record.forkdId);
    },
  };
}

function planeOf(e2b: E2bContext): EnvdPlane {
  let plane = planes.get(e2b);
  if (!plane) {
    const created = createEnvdPlane(envdDeps(e2b));
    e2b.sandboxes.onGone((id, reason) => created.endSandboxStreams(id, `the sandbox was ${reason}`));
    planes.set(e2b, created);
    plane = created;
  }
  return plane;
}

function handOver(e2b: E2bContext, request: FastifyRequest, reply: FastifyReply, sandboxId: string | undefined): Promise<void> {
  reply.hijack();
  return planeOf(e2b)
    .handle(request.raw, reply.raw, sandboxId)
    .catch((err: Error) => {
      e2b.log(`envd ${request.method} ${request.url.split("?")[0]}: ${err.message}`);
      if (!reply.raw.headersSent) {
        reply.raw.writeHead(500, { "content-type": "application/json" });
        reply.raw.end(JSON.stringify({ code: 500, message: "internal error" }));
      } else reply.raw.destroy();
    });
}

export function registerEnvdPlane(app: FastifyInstance, deps: EnvdPlaneDeps): void {
  // Bodies stay unread for the plane (a parser that reads nothing).
  app.removeAllContentTypeParsers();
  app.addContentTypeParser("*", (_request, _payload, done) => done(null, undefined));
  const handler = (request: FastifyRequest, reply: FastifyReply) => {
    // No header: a signed /files URL (planes.ts routes those here); its signature names the sandbox.
    const id = request.headers["e2b-sandbox-id"];
    return handOver(deps.e2b, request, reply, id === undefined ? undefined : typeof id === "string" ? id : "");
  };
  app.route({ method: ["GET", "POST", "PUT", "DELETE", "PATCH"], url: "/*", handler });
  app.route({ method: ["GET", "POST", "PUT", "DELETE", "PATCH"], url: "/", handler });
}

// The plane and its parsers, for the unit tests (tests/unit/e2b-envd-*.test.ts).
export {
  ConnectError,
  decodeStreamRequest,
  EnvelopeReader,
  encodeEnvelope,
  endStreamEnvelope,
  FLAG_END_STREAM,
  MAX_REQUEST_MESSAGE_BYTES,
  messageEnvelope,
  parseKeepaliveMs,
  parseTimeoutMs,
  ServerStream,
} from "./connect.js";
export type { EnvdSandbox } from "./context.js";
export { fileSignature } from "./files.js";
export { WatchLineParser } from "./filesystem.js";
export { readMultipart } from "./multipart.js";
export { createEnvdPlane } from "./plane.js";
export { endEvent } from "./process.js";
export { ENVD_VERSION } from "./version.js";
