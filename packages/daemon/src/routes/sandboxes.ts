// Sandboxes: list, fork from a snapshot, show, kill.
import {
  admitFork,
  apiSandboxView,
  branchesBySource,
  ForkdError,
  forkSandboxes,
  getSandbox,
  killSandbox,
  listSandboxes,
  validateForkCount,
  validateSandboxId,
} from "@forkd/core";
import { z } from "zod";
import * as S from "../schemas.js";
import { boundedTimeout } from "../timeouts.js";
import type { RouteDeps } from "./context.js";

export function registerSandboxRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/sandboxes", { schema: { response: { 200: S.SandboxList, ...err } } }, async () => {
    const bySource = branchesBySource();
    return listSandboxes().map((s) => apiSandboxView(s, bySource));
  });
  r.post("/v1/sandboxes", { schema: { body: S.CreateSandboxesBody, response: { 201: S.ForkResult, ...err } } }, async (request, reply) => {
    const body = request.body;
    const n = validateForkCount(body.n ?? 1);
    const ttlMs = boundedTimeout(body.timeout_ms, "timeout_ms", "sandbox");
    touch(request, "snapshots", body.snapshot_tag);
    // Reserved until the fork is over: by then its children count as alive sandboxes and show in host memory.
    const ticket = await admitFork(ctx.admission, {
      tag: body.snapshot_tag,
      n,
      memoryLimitMib: typeof body.memory_limit_mib === "number" ? body.memory_limit_mib : undefined,
    });
    const results = await forkSandboxes({
      tag: body.snapshot_tag,
      n,
      ...(typeof body.memory_limit_mib === "number" ? { memoryLimitMib: body.memory_limit_mib } : {}),
      cpuLimit: body.cpu_limit,
      network: body.network,
      ...(body.allow_out ? { allowOut: body.allow_out } : {}),
      ...(body.deny_out ? { denyOut: body.deny_out } : {}),
      ...(ttlMs !== undefined ? { ttlMs } : {}),
      ...(body.metadata ? { metadata: body.metadata } : {}),
      concurrency: 4,
      keepAgent: (id, agent) => ctx.pool.adopt(id, agent),
      onChild: (child) => {
        if (child.ok) ctx.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
      },
    }).finally(ticket.release);
    for (const child of results) touch(request, "sandboxes", child.id);
    const failed = results.filter((c) => !c.ok);
    if (failed.length > 0) {
      // forkd's fork is all or nothing: a caller given some ids and an error would leak the rest.
      for (const child of results) {
        if (!child.ok) continue;
        ctx.pool.drop(child.id);
        await killSandbox(child.id).catch(() => {});
      }
      const first = failed[0]!;
      throw new ForkdError(
        "vm_start_failed",
        `${failed.length} of ${n} children could not be restored, so none were kept: ${first.ok ? "" : first.error.message}`,
        { failures: failed.map((c) => (c.ok ? null : { id: c.id, ...c.error })) },
      );
    }
    const bySource = branchesBySource();
    return reply.code(201).send(
      results.map((c) => {
        if (!c.ok) throw new ForkdError("internal", "unreachable");
        return {
          ...apiSandboxView(getSandbox(c.id), bySource),
          timings: {
            vmm_start_ms: c.timings.vmmStartMs,
            restore_ms: c.timings.restoreMs,
            first_answer_ms: c.timings.firstAnswerMs,
            total_ms: c.timings.totalMs,
          },
        };
      }),
    );
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
}
