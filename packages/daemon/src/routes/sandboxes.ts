// Sandboxes: list, fork from a snapshot, show, kill.
import {
  admitFork,
  apiSandboxView,
  branchesBySource,
  type ForkChildResult,
  ForkdError,
  forkSandboxes,
  getSandbox,
  killSandbox,
  listSandboxes,
  poolCanServe,
  validateForkCount,
  validateSandboxId,
} from "@forkd/core";
import { z } from "zod";
import { boundedTimeout } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

/** A child just restored, as the API shows it: its SandboxInfo and how long each step took. */
export function restoredChildView(c: ForkChildResult, bySource: ReturnType<typeof branchesBySource>) {
  if (!c.ok) throw new ForkdError("internal", `child ${c.id} failed and has no view`);
  return {
    ...apiSandboxView(getSandbox(c.id), bySource),
    timings: {
      vmm_start_ms: c.timings.vmmStartMs,
      restore_ms: c.timings.restoreMs,
      first_answer_ms: c.timings.firstAnswerMs,
      total_ms: c.timings.totalMs,
    },
  };
}

export function registerSandboxRoutes({ r, ctx, err, touch }: RouteDeps): void {
  r.get("/v1/sandboxes", { schema: { querystring: S.ListSandboxesQuery, response: { 200: S.SandboxList, ...err } } }, async (request) => {
    const bySource = branchesBySource();
    // Pooled children are the daemon's, not yet anyone's: listed only when asked for.
    const all = request.query.pool === "true";
    return listSandboxes()
      .filter((s) => all || !s.pool)
      .map((s) => apiSandboxView(s, bySource));
  });
  r.post("/v1/sandboxes", { schema: { body: S.CreateSandboxesBody, response: { 201: S.ForkResult, ...err } } }, async (request, reply) => {
    const body = request.body;
    const n = validateForkCount(body.n ?? 1);
    const ttlMs = boundedTimeout(body.timeout_ms, "timeout_ms", "sandbox");
    touch(request, "snapshots", body.snapshot_tag);
    // The snapshot's hot pool first: a pooled child is handed out in the time of an identity call.
    const pooled = poolCanServe({
      memoryLimitMib: body.memory_limit_mib,
      cpuLimit: body.cpu_limit,
      network: body.network,
      allowOut: body.allow_out,
      denyOut: body.deny_out,
    })
      ? await ctx.hotPools.claim(body.snapshot_tag, n, {
          ...(ttlMs !== undefined ? { ttlMs } : {}),
          ...(body.metadata ? { metadata: body.metadata } : {}),
        })
      : [];
    for (const c of pooled) touch(request, "sandboxes", c.id);
    const fresh = n - pooled.length;
    const restoreFresh = async (): Promise<ForkChildResult[]> => {
      if (fresh === 0) return [];
      // Reserved until the fork is over: by then its children count as alive sandboxes and show in host memory.
      const ticket = await admitFork(ctx.admission, {
        tag: body.snapshot_tag,
        n: fresh,
        memoryLimitMib: typeof body.memory_limit_mib === "number" ? body.memory_limit_mib : undefined,
      });
      return ctx.hotPools.userFork(() => restore().finally(ticket.release));
    };
    const restore = () =>
      forkSandboxes({
        tag: body.snapshot_tag,
        n: fresh,
        ...(typeof body.memory_limit_mib === "number" ? { memoryLimitMib: body.memory_limit_mib } : {}),
        cpuLimit: body.cpu_limit,
        network: body.network,
        ...(body.allow_out ? { allowOut: body.allow_out } : {}),
        ...(body.deny_out ? { denyOut: body.deny_out } : {}),
        ...(ttlMs !== undefined ? { ttlMs } : {}),
        ...(body.metadata ? { metadata: body.metadata } : {}),
        // Restores in flight: from the host's cores (core's defaultRestoreConcurrency).
        keepAgent: (id, agent) => ctx.pool.adopt(id, agent),
        onChild: (child) => {
          if (child.ok) ctx.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
        },
      });
    const dropPooled = async () => {
      for (const c of pooled) {
        ctx.pool.drop(c.id);
        await killSandbox(c.id).catch(() => {});
      }
    };
    const results = await restoreFresh().catch(async (e: unknown) => {
      await dropPooled();
      throw e;
    });
    for (const child of results) touch(request, "sandboxes", child.id);
    const failed = results.filter((c) => !c.ok);
    if (failed.length > 0) {
      // forkd's fork is all or nothing: a caller given some ids and an error would leak the rest.
      await dropPooled();
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
    return reply.code(201).send([
      ...pooled.map((c) => ({
        ...apiSandboxView(getSandbox(c.id), bySource),
        timings: { vmm_start_ms: 0, restore_ms: 0, first_answer_ms: c.claimMs, total_ms: c.claimMs, pool_claim_ms: c.claimMs },
      })),
      ...results.map((c) => restoredChildView(c, bySource)),
    ]);
  });
  r.get("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 200: S.Sandbox, ...err } } }, async (request) =>
    apiSandboxView(getSandbox(request.params.id)),
  );
  r.delete("/v1/sandboxes/:id", { schema: { params: S.IdParam, response: { 204: z.null(), ...err } } }, async (request, reply) => {
    validateSandboxId(request.params.id);
    ctx.pool.drop(request.params.id);
    await killSandbox(request.params.id);
    // A pooled child killed by id leaves its pool short: refill it.
    ctx.hotPools.kick();
    return reply.code(204).send(null);
  });
}
