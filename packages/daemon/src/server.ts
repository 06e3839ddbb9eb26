// The REST API v1. Every route validates with the zod schemas in schemas.ts,
// every failure leaves as {"error":{code,message}} with the status from core's
// one error table, and every request is audited (never with its headers).
import { PassThrough } from "node:stream";
import swagger from "@fastify/swagger";
import {
  apiSandboxView,
  apiSnapshotView,
  branches,
  chooseAccel,
  createSnapshot,
  ERROR_STATUS,
  ForkdError,
  forkSandboxes,
  getSandbox,
  getSnapshot,
  isForkdError,
  killSandbox,
  listSandboxes,
  listSnapshots,
  removeSnapshot,
  startBranch,
  validateForkCount,
  validateName,
  validateSandboxId,
} from "@forkd/core";
import Fastify, { type FastifyError, type FastifyInstance, type FastifyRequest } from "fastify";
import { jsonSchemaTransform, serializerCompiler, validatorCompiler, type ZodTypeProvider } from "fastify-type-provider-zod";
import { z } from "zod";
import type { AuditLog } from "./audit.js";
import { bearer, tokenMatches } from "./auth.js";
import type { Metrics } from "./metrics.js";
import type { AgentPool } from "./pool.js";
import * as S from "./schemas.js";

export const FORKD_VERSION = "0.1.0";
/** Large enough for an 8 MiB file write (base64 grows it by a third), small enough to refuse abuse early. */
export const BODY_LIMIT_BYTES = 12 * 2 ** 20;

export type ServerContext = {
  token: string;
  audit: AuditLog;
  metrics: Metrics;
  pool: AgentPool;
  maxSandboxes: number;
  /** BRANCHes in progress at once across all sources; more get 503. */
  maxBranches: number;
};

declare module "fastify" {
  interface FastifyRequest {
    touched?: { sandboxes: Set<string>; snapshots: Set<string> };
    errorCode?: string;
  }
}

function errorBody(code: string, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...(details && Object.keys(details).length ? { details } : {}) } };
}

/** Fastify's own failures (parsing, limits, content types) mapped onto our codes. */
function classify(err: FastifyError & { validation?: unknown }): {
  status: number;
  code: string;
  message: string;
  details?: Record<string, unknown>;
} {
  if (isForkdError(err)) return { status: err.httpStatus, code: err.code, message: err.message, details: err.details };
  if (err.validation || err.code === "FST_ERR_VALIDATION") {
    return {
      status: ERROR_STATUS.validation_failed,
      code: "validation_failed",
      message: `request does not match the schema: ${err.message}`,
    };
  }
  switch (err.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return { status: 413, code: "too_large", message: `request body is larger than ${BODY_LIMIT_BYTES} bytes` };
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return { status: 415, code: "unsupported_media_type", message: "send JSON with Content-Type: application/json" };
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return { status: 400, code: "bad_request", message: "the JSON body is empty" };
    case "FST_ERR_CTP_INVALID_JSON_BODY":
      return { status: 400, code: "bad_request", message: `the body is not valid JSON: ${err.message}` };
  }
  if (err instanceof SyntaxError || err.statusCode === 400)
    return { status: 400, code: "bad_request", message: `malformed request: ${err.message}` };
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500)
    return { status: err.statusCode, code: "bad_request", message: err.message };
  return { status: 500, code: "internal", message: "internal error; see the daemon log" };
}

function touch(request: FastifyRequest, kind: "sandboxes" | "snapshots", value: string | undefined | null): void {
  if (!value) return;
  request.touched ??= { sandboxes: new Set(), snapshots: new Set() };
  request.touched[kind].add(value);
}

// Shared by the unix-socket and TCP servers of one daemon: the cap is per daemon.
let inFlightBranches = 0;

export async function buildServer(ctx: ServerContext, opts: { https?: { cert: Buffer; key: Buffer } } = {}): Promise<FastifyInstance> {
  const app = Fastify({
    bodyLimit: BODY_LIMIT_BYTES,
    logger: false,
    ...(opts.https ? { https: opts.https } : {}),
  }) as unknown as FastifyInstance;
  // The API speaks JSON only: anything else is a 415, not a string body that fails the schema.
  app.removeContentTypeParser("text/plain");
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
    if (request.url === "/healthz") return;
    if (!tokenMatches(ctx.token, bearer(request.headers.authorization))) {
      request.errorCode = "unauthorized";
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
    });
  });

  app.setErrorHandler((err: FastifyError, request, reply) => {
    const c = classify(err);
    request.errorCode = c.code;
    if (c.status >= 500) request.log.error(err);
    void reply.code(c.status).send(errorBody(c.code, c.message, c.details));
  });
  app.setNotFoundHandler((request, reply) => {
    request.errorCode = "not_found";
    void reply.code(404).send(errorBody("not_found", `no route ${request.method} ${request.url.split("?")[0]}; see GET /v1/openapi.json`));
  });

  const r = app.withTypeProvider<ZodTypeProvider>();
  const err = { 400: S.ErrorBody, 401: S.ErrorBody, 404: S.ErrorBody, 409: S.ErrorBody, 422: S.ErrorBody };

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

  // Snapshots
  r.get("/v1/snapshots", { schema: { response: { 200: S.SnapshotList, ...err } } }, async () => ({
    snapshots: (await listSnapshots()).map(apiSnapshotView),
    pending: branches
      .list()
      .filter((b) => b.status !== "ready")
      .map((b) => ({
        tag: b.tag,
        status: b.status as "writing" | "failed",
        mode: b.mode,
        branched_from: b.source_id,
        error: b.error,
        created_at: b.created_at,
      })),
  }));
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
    const snapshot = await createSnapshot({
      tag: body.tag,
      image: body.image,
      warm: body.warm,
      warmEval: body.warm_eval,
      memoryMib: body.memory_mib,
      vcpus: body.vcpus,
    });
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
        querystring: z.object({ force: z.enum(["true", "false"]).optional() }).strict(),
        response: { 204: z.null(), ...err },
      },
    },
    async (request, reply) => {
      const { killed } = await removeSnapshot(request.params.tag, { force: request.query.force === "true" });
      for (const id of killed) {
        ctx.pool.drop(id);
        touch(request, "sandboxes", id);
      }
      return reply.code(204).send(null);
    },
  );

  // Sandboxes
  r.get("/v1/sandboxes", { schema: { response: { 200: S.SandboxList, ...err } } }, async () => ({
    sandboxes: listSandboxes().map(apiSandboxView),
  }));
  r.post("/v1/sandboxes", { schema: { body: S.CreateSandboxesBody, response: { 201: S.ForkResult, ...err } } }, async (request, reply) => {
    const body = request.body;
    const n = validateForkCount(body.n ?? 1);
    touch(request, "snapshots", body.snapshot_tag);
    const alive = listSandboxes().filter((s) => s.alive).length;
    if (alive + n > ctx.maxSandboxes) {
      throw new ForkdError(
        "over_limit",
        `${alive} sandboxes run and ${n} more would pass this daemon's limit of ${ctx.maxSandboxes}; kill some or raise --max-sandboxes`,
      );
    }
    const started = performance.now();
    const results = await forkSandboxes({
      tag: body.snapshot_tag,
      n,
      memoryLimitMib: body.memory_limit_mib,
      network: body.network,
      ...(body.timeout_ms !== undefined ? { ttlMs: body.timeout_ms } : {}),
      ...(body.metadata ? { metadata: body.metadata } : {}),
      concurrency: 4,
      keepAgent: (id, agent) => ctx.pool.adopt(id, agent),
      onChild: (child) => {
        if (child.ok) ctx.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
      },
    });
    for (const child of results) touch(request, "sandboxes", child.id);
    if (!results.some((c) => c.ok)) {
      const first = results.find((c) => !c.ok);
      throw new ForkdError("vm_start_failed", `no child could be restored: ${first && !first.ok ? first.error.message : "unknown"}`);
    }
    return reply.code(201).send({
      wall_ms: performance.now() - started,
      sandboxes: results.map((c) =>
        c.ok
          ? {
              id: c.id,
              ok: true,
              vmm_start_ms: c.timings.vmmStartMs,
              restore_ms: c.timings.restoreMs,
              first_answer_ms: c.timings.firstAnswerMs,
              total_ms: c.timings.totalMs,
            }
          : { id: c.id, ok: false, error: c.error },
      ),
    });
  });
  r.get("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 200: S.Sandbox, ...err } } }, async (request) =>
    apiSandboxView(getSandbox(request.params.id)),
  );
  r.delete("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 204: z.null(), ...err } } }, async (request, reply) => {
    validateSandboxId(request.params.id);
    ctx.pool.drop(request.params.id);
    await killSandbox(request.params.id);
    return reply.code(204).send(null);
  });
  r.post(
    "/v1/sandboxes/:id/branch",
    { schema: { params: S.IdParam, body: S.BranchBody, response: { 201: S.BranchResponse, 202: S.BranchResponse, ...err } } },
    async (request, reply) => {
      getSandbox(request.params.id);
      if (inFlightBranches >= ctx.maxBranches) {
        throw new ForkdError("over_limit", `${inFlightBranches} BRANCHes are in progress, the limit is ${ctx.maxBranches}; retry shortly`);
      }
      inFlightBranches++;
      ctx.metrics.branchesInFlight.inc();
      let started: Awaited<ReturnType<typeof startBranch>>;
      try {
        started = await startBranch(request.params.id, { tag: request.body.tag, mode: request.body.mode });
      } catch (e) {
        inFlightBranches--;
        ctx.metrics.branchesInFlight.dec();
        throw e;
      }
      touch(request, "snapshots", started.status.tag);
      ctx.metrics.branchPauseSeconds.labels(started.status.mode).observe(started.status.pause_ms / 1000);
      const done = started.done.finally(() => {
        inFlightBranches--;
        ctx.metrics.branchesInFlight.dec();
      });
      if (request.body.wait === false) {
        done.catch(() => {});
        return reply.code(202).send(started.status);
      }
      const finished = await done;
      if (finished.status === "failed") throw new ForkdError("vm_start_failed", `BRANCH failed: ${finished.error}`, { tag: finished.tag });
      return reply.code(201).send(finished);
    },
  );

  r.post("/v1/sandboxes/:id/ping", { schema: { params: S.IdParam, response: { 200: S.PingResponse, ...err } } }, async (request) => {
    const agent = await ctx.pool.forSandbox(request.params.id);
    const t0 = performance.now();
    const pong = await agent.ping({ timeoutMs: 10_000 });
    return { version: pong.version, uptime_ms: pong.uptimeMs, hostname: pong.hostname, rtt_ms: performance.now() - t0 };
  });

  const execRequest = (body: S.ExecBodyT) => {
    if ((body.argv === undefined) === (body.cmd === undefined)) {
      throw new ForkdError("bad_request", "exec takes exactly one of `argv` (array of strings) or `cmd` (shell string)");
    }
    if (body.timeout_ms !== undefined && (body.timeout_ms < 1 || body.timeout_ms > S.MAX_EXEC_TIMEOUT_MS)) {
      throw new ForkdError("bad_request", `timeout_ms must be from 1 to ${S.MAX_EXEC_TIMEOUT_MS}, got ${body.timeout_ms}`);
    }
    return {
      ...(body.argv ? { argv: body.argv } : { cmd: body.cmd }),
      ...(body.env ? { env: body.env } : {}),
      ...(body.cwd ? { cwd: body.cwd } : {}),
      ...(body.stdin !== undefined ? { stdin: Buffer.from(body.stdin, body.stdin_encoding ?? "utf8").toString("base64") } : {}),
      ...(body.timeout_ms ? { timeoutMs: body.timeout_ms } : {}),
    };
  };

  r.post(
    "/v1/sandboxes/:id/exec",
    { schema: { params: S.IdParam, body: S.ExecBody, response: { 200: S.ExecResponse, ...err } } },
    async (request) => {
      const exec = execRequest(request.body);
      const agent = await ctx.pool.forSandbox(request.params.id);
      const stdout: Buffer[] = [];
      const stderr: Buffer[] = [];
      const t0 = performance.now();
      const res = await agent.exec(exec, { onStdout: (d) => stdout.push(d), onStderr: (d) => stderr.push(d) });
      ctx.metrics.callSeconds.labels("exec").observe((performance.now() - t0) / 1000);
      return {
        exit_code: res.exitCode,
        signal: res.signal,
        timed_out: res.timedOut,
        stdout: Buffer.concat(stdout).toString("utf8"),
        stderr: Buffer.concat(stderr).toString("utf8"),
        duration_ms: res.durationMs,
      };
    },
  );

  // Streaming exec: newline-delimited JSON, one object per output chunk, then the exit.
  r.post("/v1/sandboxes/:id/exec/stream", { schema: { params: S.IdParam, body: S.ExecBody } }, async (request, reply) => {
    const exec = execRequest(request.body);
    const agent = await ctx.pool.forSandbox(request.params.id);
    const out = new PassThrough();
    const line = (obj: unknown) => out.write(`${JSON.stringify(obj)}\n`);
    const abort = new AbortController();
    request.raw.on("close", () => {
      if (!reply.raw.writableFinished) abort.abort();
    });
    const t0 = performance.now();
    agent
      .exec(exec, {
        signal: abort.signal,
        onStdout: (d) => line({ type: "stdout", data: d.toString("base64") }),
        onStderr: (d) => line({ type: "stderr", data: d.toString("base64") }),
      })
      .then((res) => {
        ctx.metrics.callSeconds.labels("exec").observe((performance.now() - t0) / 1000);
        line({ type: "exit", exit_code: res.exitCode, signal: res.signal, timed_out: res.timedOut, duration_ms: res.durationMs });
      })
      .catch((e: Error) => line({ type: "error", error: { code: isForkdError(e) ? e.code : "internal", message: e.message } }))
      .finally(() => out.end());
    return reply.header("content-type", "application/x-ndjson").send(out);
  });

  r.post(
    "/v1/sandboxes/:id/eval",
    { schema: { params: S.IdParam, body: S.EvalBody, response: { 200: S.EvalResponse, ...err } } },
    async (request) => {
      if (request.body.language === "python") {
        throw new ForkdError("bad_request", "language 'python' is not available in this sandbox's image; it has: javascript");
      }
      const agent = await ctx.pool.forSandbox(request.params.id);
      const t0 = performance.now();
      const res = await agent.eval(request.body.code, {
        ...(request.body.timeout_ms ? { evalTimeoutMs: request.body.timeout_ms } : {}),
        ...(request.body.language ? { language: request.body.language } : {}),
        // The agent enforces the eval's own timeout; the call may take a little longer.
        timeoutMs: (request.body.timeout_ms ?? 30_000) + 10_000,
      });
      ctx.metrics.callSeconds.labels("eval").observe((performance.now() - t0) / 1000);
      return { value: res.value, type: res.type, duration_ms: res.durationMs, ...(res.stdout ? { stdout: res.stdout } : {}) };
    },
  );

  r.post(
    "/v1/sandboxes/:id/files",
    { schema: { params: S.IdParam, body: S.FilesBody, response: { 200: z.record(z.string(), z.unknown()), ...err } } },
    async (request) => {
      const agent = await ctx.pool.forSandbox(request.params.id);
      const body = request.body;
      if (body.action === "write") {
        const data = Buffer.from(body.data, body.encoding ?? "utf8").toString("base64");
        return agent.files<Record<string, unknown>>({
          action: "write",
          path: body.path,
          data,
          ...(body.mode !== undefined ? { mode: body.mode } : {}),
        });
      }
      const res = await agent.files<Record<string, unknown>>(body);
      return body.action === "read" ? { ...res, encoding: "base64" } : res;
    },
  );

  return app;
}
