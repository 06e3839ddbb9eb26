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
  killE2bSandbox,
  MAX_TIMEOUT_S,
  pauseE2bSandbox,
  setE2bTimeout,
} from "./lifecycle.js";
import { listPage } from "./paging.js";
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
const PauseBody = z.looseObject({ memory: z.boolean().nullish() }).nullish();

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

  app.post("/sandboxes/:sandboxID/pause", async (request, reply) => {
    const { sandboxID } = SandboxParams.parse(request.params);
    PauseBody.parse(request.body);
    if (!(await pauseE2bSandbox(e2b, sandboxID))) throw new E2bHttpError(409, `sandbox ${sandboxID} is already paused`);
    return reply.code(204).send();
  });
}
