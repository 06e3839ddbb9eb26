// E2B's control plane (api.e2b.app's routes the SDKs call), with E2B's field names
// and status codes. Bodies are checked with zod here (a ZodError is E2B's 400).
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";
import {
  connectE2bSandbox,
  createE2bSandbox,
  DEFAULT_TIMEOUT_S,
  forkE2bSandbox,
  killE2bSandbox,
  MAX_TIMEOUT_S,
  pauseE2bSandbox,
  refreshE2bSandbox,
  setE2bTimeout,
} from "./lifecycle.js";
import { e2bMetrics } from "./metrics.js";
import { listPage, pageOf } from "./paging.js";
import { createE2bSnapshot, deleteE2bTemplate, listE2bSnapshots } from "./snapshots.js";
import { sandboxCreatedView, sandboxDetailView, sandboxListedView } from "./views.js";

export type ControlPlaneDeps = { e2b: E2bContext };

const TimeoutS = z.number().int().min(0).max(MAX_TIMEOUT_S);
const StringMap = z
  .record(z.string().max(256), z.string().max(32 * 1024))
  .refine((m) => Object.keys(m).length <= 256, "at most 256 entries");
const EgressList = z.array(z.string().min(1).max(256)).max(256);

const CreateBody = z.looseObject({
  templateID: z.string().min(1).max(128),
  timeout: TimeoutS.optional(),
  metadata: StringMap.nullish(),
  envVars: StringMap.nullish(),
  allow_internet_access: z.boolean().nullish(),
  network: z
    .looseObject({
      allowOut: EgressList.nullish(),
      denyOut: EgressList.nullish(),
      allowPublicTraffic: z.boolean().nullish(),
    })
    .nullish(),
  autoPause: z.boolean().nullish(),
  secure: z.boolean().nullish(),
  volumeMounts: z.array(z.unknown()).max(0, "volumes are not served by forkd").nullish(),
  mcp: z.null().optional(),
});

const SandboxParams = z.object({ sandboxID: z.string().min(1).max(128) });
const ConnectBody = z.looseObject({ timeout: TimeoutS.optional(), memory: z.boolean().nullish() }).nullish();
const TimeoutBody = z.object({ timeout: TimeoutS });
const RefreshBody = z.looseObject({ duration: TimeoutS.optional() }).nullish();
const PauseBody = z.looseObject({ memory: z.boolean().nullish() }).nullish();
/** forkd's live fork-to-many takes at most this many children in one call (validateForkCount). */
const MAX_FORK_COUNT = 64;
const ForkBody = z.looseObject({ count: z.number().int().min(1).max(MAX_FORK_COUNT).optional(), timeout: TimeoutS.optional() }).nullish();
const SnapshotBody = z.looseObject({ name: z.string().min(1).max(64).optional() }).nullish();
const SnapshotQuery = z.looseObject({
  sandboxID: z.string().max(128).optional(),
  name: z.string().max(128).optional(),
  limit: z.coerce.number().int().min(1).max(100).optional(),
  nextToken: z.string().max(512).optional(),
});
const TemplateParams = z.object({ templateID: z.string().min(1).max(128) });

export function registerControlPlane(app: FastifyInstance, { e2b }: ControlPlaneDeps): void {
  const create = async (body: unknown) => {
    const b = CreateBody.parse(body);
    return createE2bSandbox(e2b, {
      templateID: b.templateID,
      timeoutS: b.timeout ?? DEFAULT_TIMEOUT_S,
      metadata: b.metadata ?? {},
      envVars: b.envVars ?? {},
      allowInternetAccess: b.allow_internet_access ?? true,
      allowOut: b.network?.allowOut ?? [],
      denyOut: b.network?.denyOut ?? [],
      autoPause: b.autoPause ?? false,
      secure: b.secure ?? true,
    });
  };
  for (const url of ["/sandboxes", "/v2/sandboxes"]) {
    app.post(url, async (request, reply) => reply.code(201).send(sandboxCreatedView(await create(request.body))));
  }

  app.get("/sandboxes", async (request, reply) => {
    const page = listPage(e2b, request.query, { states: ["running"] });
    if (page.nextToken) void reply.header("x-next-token", page.nextToken);
    return page.items.map(sandboxListedView);
  });
  app.get("/v2/sandboxes", async (request, reply) => {
    const page = listPage(e2b, request.query, {});
    if (page.nextToken) void reply.header("x-next-token", page.nextToken);
    return page.items.map(sandboxListedView);
  });

  app.get("/sandboxes/:sandboxID", async (request) =>
    sandboxDetailView(e2b.sandboxes.require(SandboxParams.parse(request.params).sandboxID)),
  );
  app.delete("/sandboxes/:sandboxID", async (request, reply) => {
    await killE2bSandbox(e2b, SandboxParams.parse(request.params).sandboxID);
    return reply.code(204).send();
  });

  app.post("/sandboxes/:sandboxID/timeout", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    await setE2bTimeout(e2b, sandboxID, TimeoutBody.parse(request.body).timeout);
    return reply.code(204).send();
  });

  app.post("/sandboxes/:sandboxID/refreshes", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    await refreshE2bSandbox(e2b, sandboxID, RefreshBody.parse(request.body)?.duration ?? DEFAULT_TIMEOUT_S);
    return reply.code(204).send();
  });

  const connect = async (params: unknown, body: unknown, refuseRunning: boolean) => {
    const { sandboxID } = SandboxParams.parse(params);
    const b = ConnectBody.parse(body);
    if (refuseRunning && e2b.sandboxes.require(sandboxID).forkdId) throw new E2bHttpError(409, `sandbox ${sandboxID} is already running`);
    return connectE2bSandbox(e2b, sandboxID, b?.timeout);
  };
  for (const url of ["/sandboxes/:sandboxID/connect", "/v2/sandboxes/:sandboxID/connect"]) {
    app.post(url, async (request, reply) => {
      const { record, resumed } = await connect(request.params, request.body, false);
      return reply.code(resumed ? 201 : 200).send(sandboxCreatedView(record));
    });
  }
  // The older resume call: 409 for a running sandbox.
  app.post("/sandboxes/:sandboxID/resume", async (request, reply) => {
    const { record } = await connect(request.params, request.body, true);
    return reply.code(201).send(sandboxCreatedView(record));
  });

  app.post("/sandboxes/:sandboxID/fork", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    const b = ForkBody.parse(request.body);
    const children = await forkE2bSandbox(e2b, sandboxID, b?.count ?? 1, b?.timeout);
    return reply.code(201).send(children.map((child) => ({ sandbox: sandboxCreatedView(child) })));
  });

  app.get("/sandboxes/:sandboxID/metrics", async (request) => e2bMetrics(e2b, SandboxParams.parse(request.params).sandboxID));

  app.post("/sandboxes/:sandboxID/snapshots", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    const snap = await createE2bSnapshot(e2b, sandboxID, SnapshotBody.parse(request.body)?.name);
    return reply.code(201).send({ snapshotID: snap.snapshotID, names: [snap.snapshotID] });
  });
  app.get("/snapshots", async (request, reply) => {
    const q = SnapshotQuery.parse(request.query ?? {});
    const all = await listE2bSnapshots(e2b, { ...(q.sandboxID ? { sandboxID: q.sandboxID } : {}), ...(q.name ? { name: q.name } : {}) });
    const page = pageOf(e2b, all, (s) => ({ atMs: s.createdAtMs, id: s.snapshotID }), q.limit, q.nextToken);
    if (page.nextToken) void reply.header("x-next-token", page.nextToken);
    return page.items.map((s) => ({ snapshotID: s.snapshotID, names: [s.snapshotID] }));
  });
  app.delete("/templates/:templateID", async (request, reply) => {
    await deleteE2bTemplate(e2b, TemplateParams.parse(request.params).templateID);
    return reply.code(204).send();
  });

  app.post("/sandboxes/:sandboxID/pause", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    PauseBody.parse(request.body);
    if (!(await pauseE2bSandbox(e2b, sandboxID))) throw new E2bHttpError(409, `sandbox ${sandboxID} is already paused`);
    return reply.code(204).send();
  });
}
