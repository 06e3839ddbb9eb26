// The fuzzer's generator must never send a request that would do real work: a
// guarded operation is always refused by its strict schema (or its content type,
// or its JSON), and never names a sandbox or snapshot that exists.
import fs from "node:fs";
import path from "node:path";
import { type FuzzRequest, GUARD_KEY, type OpenApiDoc, operations, requestArbitrary } from "@forkd/cli/bench/fuzz-gen";
import * as S from "@forkd/daemon/schemas";
import fc from "fast-check";
import { describe, expect, it } from "vitest";

const known = { sandboxIds: ["sb-0123456789ab", "sb-ba9876543210"], tags: ["fuzz-warm"], pids: ["42"] };

/** A small OpenAPI document in the daemon's shape, with the routes the guard is about and some it is not. */
const doc: OpenApiDoc = JSON.parse(
  fs.readFileSync(path.join(import.meta.dirname, "fixtures", "openapi-sample.json"), "utf8"),
) as OpenApiDoc;

function parsed(req: FuzzRequest): unknown {
  try {
    return JSON.parse(req.body?.toString("utf8") ?? "");
  } catch {
    return undefined;
  }
}

describe("fuzz request generation", () => {
  const ops = operations(doc);

  it("reads every operation of the document, guarding the ones that do real work", () => {
    const guarded = ops.filter((o) => o.guarded).map((o) => `${o.method} ${o.path}`);
    expect(guarded).toEqual(
      expect.arrayContaining([
        "POST /v1/snapshots",
        "POST /v1/sandboxes",
        "POST /v1/sandboxes/{id}/branch",
        "DELETE /v1/sandboxes/{id}",
        "POST /v1/snapshots/pull",
      ]),
    );
    expect(ops.find((o) => o.path === "/v1/sandboxes/{id}/exec")?.guarded).toBe(false);
    // A route added later is guarded until someone says it is safe.
    expect(
      operations({ paths: { "/v1/snapshots/{tag}/pool": { put: {} }, "/v1/sandboxes/{id}/fork": { post: {} } } }).every((o) => o.guarded),
    ).toBe(true);
  });

  it("never sends a guarded operation a body its strict schema could accept, nor a real id", () => {
    fc.assert(
      fc.property(requestArbitrary(ops, known, "token-token-token"), (req) => {
        const op = ops.find((o) => `${o.method} ${o.path}` === req.op)!;
        if (!op.guarded && req.mutation !== "wrong_method") return;
        for (const id of [...known.sandboxIds, ...known.tags, ...known.pids]) {
          expect(req.target.split("?")[0]!.split("/")).not.toContain(id);
        }
        if (!op.guarded) return;
        const body = parsed(req);
        if (body !== null && typeof body === "object" && !Array.isArray(body)) expect(body).toHaveProperty(GUARD_KEY);
        // And what the daemon would parse is refused by the route's schema: a strict body never has GUARD_KEY.
        if (op.path === "/v1/sandboxes" && body !== undefined) expect(S.CreateSandboxesBody.safeParse(body).success).toBe(false);
        if (op.path === "/v1/snapshots" && body !== undefined) expect(S.CreateSnapshotBody.safeParse(body).success).toBe(false);
        if (op.path === "/v1/snapshots/pull" && body !== undefined) expect(S.PullBody.safeParse(body).success).toBe(false);
      }),
      { numRuns: 3000, seed: 7 },
    );
  });

  it("is the same run for the same seed", () => {
    const a = fc.sample(requestArbitrary(ops, known, "t"), { numRuns: 50, seed: 11 });
    const b = fc.sample(requestArbitrary(ops, known, "t"), { numRuns: 50, seed: 11 });
    expect(a.map((r) => r.target)).toEqual(b.map((r) => r.target));
  });
});
