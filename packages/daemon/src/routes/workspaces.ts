// Workspaces (forkd's /v1/workspaces): named sandboxes suspended to disk and resumed.
import {
  admitBranch,
  admitFork,
  apiWorkspaceView,
  createWorkspace,
  deleteWorkspace,
  getWorkspace,
  listSandboxes,
  listWorkspaces,
  resumeWorkspace,
  suspendWorkspace,
} from "@forkd/core";
import { z } from "zod";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerWorkspaceRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/workspaces", { schema: { response: { 200: S.WorkspaceList, ...err } } }, async () => listWorkspaces().map(apiWorkspaceView));
  r.post("/v1/workspaces", { schema: { body: S.CreateWorkspaceBody, response: { 201: S.Workspace, ...err } } }, async (request, reply) => {
    touch(request, "snapshots", request.body.snapshot_tag);
    const memoryLimitMib = typeof request.body.memory_limit_mib === "number" ? request.body.memory_limit_mib : undefined;
    const ticket = await admitFork(ctx.admission, { tag: request.body.snapshot_tag, n: 1, memoryLimitMib });
    const row = await createWorkspace({
      name: request.body.name,
      snapshotTag: request.body.snapshot_tag,
      ...(memoryLimitMib !== undefined ? { memoryLimitMib } : {}),
    }).finally(ticket.release);
    touch(request, "sandboxes", row.sandbox_id);
    return reply.code(201).send(apiWorkspaceView(row));
  });
  r.get("/v1/workspaces/:name", { schema: { params: S.NameParam, response: { 200: S.Workspace, ...err } } }, async (request) =>
    apiWorkspaceView(getWorkspace(request.params.name)),
  );
  r.delete("/v1/workspaces/:name", { schema: { params: S.NameParam, response: { 204: z.null(), ...err } } }, async (request, reply) => {
    const row = getWorkspace(request.params.name);
    if (row.sandbox_id) ctx.agents.drop(row.sandbox_id);
    await deleteWorkspace(request.params.name);
    return reply.code(204).send(null);
  });
  r.post(
    "/v1/workspaces/:name/suspend",
    { schema: { params: S.NameParam, body: S.SuspendWorkspaceBody.optional(), response: { 200: S.Workspace, ...err } } },
    async (request) => {
      const before = getWorkspace(request.params.name);
      // Suspending is a BRANCH of its sandbox (when it has one; otherwise suspend refuses it).
      const source = before.sandbox_id ? listSandboxes().find((s) => s.id === before.sandbox_id) : undefined;
      const ticket = source ? await admitBranch(ctx.admission, source.memory_mib) : undefined;
      const row = await suspendWorkspace(request.params.name, { diff: request.body?.diff === true }).finally(() => ticket?.release());
      if (before.sandbox_id) {
        ctx.agents.drop(before.sandbox_id);
        touch(request, "sandboxes", before.sandbox_id);
      }
      touch(request, "snapshots", row.state_tag);
      return apiWorkspaceView(row);
    },
  );
  r.post("/v1/workspaces/:name/resume", { schema: { params: S.NameParam, response: { 200: S.Workspace, ...err } } }, async (request) => {
    const before = getWorkspace(request.params.name);
    const ticket =
      before.status === "running"
        ? undefined
        : await admitFork(ctx.admission, {
            tag: before.state_tag ?? before.source_tag,
            n: 1,
            memoryLimitMib: before.memory_limit_mib ?? undefined,
          });
    const row = await resumeWorkspace(request.params.name).finally(() => ticket?.release());
    touch(request, "sandboxes", row.sandbox_id);
    return apiWorkspaceView(row);
  });
}
