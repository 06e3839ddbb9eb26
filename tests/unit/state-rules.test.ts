// The state tables: every state of a sandbox and of a snapshot has a decision for
// every operation, the key decisions are the ones the README promises, and a
// refusal names the state, the operation and what to do.
import {
  assertSandboxAllows,
  assertSnapshotAllows,
  assertWorkspaceAllows,
  claimableBranchStatuses,
  ForkdError,
  SANDBOX_OPS,
  SANDBOX_RULES,
  SANDBOX_STATES,
  SNAPSHOT_OPS,
  SNAPSHOT_RULES,
  SNAPSHOT_STATES,
  sandboxAllows,
  sandboxRowsAllowing,
  sandboxState,
  snapshotAllows,
  snapshotStateOf,
  WORKSPACE_OPS,
  WORKSPACE_RULES,
  WORKSPACE_STATES,
  workspaceAllows,
  workspaceState,
} from "@forkd/core";
import Database from "better-sqlite3";
import { describe, expect, it } from "vitest";

function refusal(fn: () => void): ForkdError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ForkdError) return err;
    throw err;
  }
  throw new Error("expected a refusal");
}

describe("the sandbox table", () => {
  it("has a decision for every state and operation, and nothing else", () => {
    expect(Object.keys(SANDBOX_RULES).sort()).toEqual([...SANDBOX_STATES].sort());
    for (const state of SANDBOX_STATES) {
      expect(Object.keys(SANDBOX_RULES[state]).sort()).toEqual([...SANDBOX_OPS].sort());
      for (const op of SANDBOX_OPS) {
        const d = SANDBOX_RULES[state][op];
        if (!d.allow) expect(d.todo.length, `${state} × ${op} says what to do`).toBeGreaterThan(0);
      }
    }
  });

  it("reads the state from the row: starting, else unhealthy by its health column, else running", () => {
    expect(sandboxState({ state: "starting" })).toBe("starting");
    expect(sandboxState({ state: "starting", health: "unhealthy" })).toBe("starting");
    expect(sandboxState({ state: "running", health: null })).toBe("running");
    expect(sandboxState({ state: "running", health: "unhealthy" })).toBe("unhealthy");
  });

  it("lets a running sandbox do everything", () => {
    for (const op of SANDBOX_OPS) expect(sandboxAllows("running", op), op).toBe(true);
  });

  it("keeps a child that has not answered to its starter: hidden, never expired or handed out, but killable", () => {
    expect(sandboxAllows("starting", "list")).toBe(false);
    expect(sandboxAllows("starting", "show")).toBe(false);
    expect(sandboxAllows("starting", "expire")).toBe(false);
    expect(sandboxAllows("starting", "claim")).toBe(false);
    expect(sandboxAllows("starting", "kill")).toBe(true);
    const e = refusal(() => assertSandboxAllows({ id: "sb-000000000001", state: "starting" }, "show"));
    expect(e.code).toBe("sandbox_not_found");
    expect(e.message).toContain("sb-000000000001 is still starting");
  });

  it("refuses agent calls and pool hand-outs for an unhealthy guest with invalid_state, naming why and what to do", () => {
    expect(sandboxAllows("unhealthy", "kill")).toBe(true);
    expect(sandboxAllows("unhealthy", "show")).toBe(true);
    expect(sandboxAllows("unhealthy", "claim")).toBe(false);
    const e = refusal(() =>
      assertSandboxAllows({ id: "sb-000000000002", state: "running", health: "unhealthy", health_reason: "oversize frame" }, "connect"),
    );
    expect(e.code).toBe("invalid_state");
    expect(e.httpStatus).toBe(409);
    expect(e.message).toMatch(/sandbox sb-000000000002 is unhealthy \(oversize frame\), so it cannot take agent calls.*kill it/);
    expect(e.details).toMatchObject({ id: "sb-000000000002", state: "unhealthy", op: "connect", health: "unhealthy" });
  });

  it("allows quietly", () => {
    expect(() => assertSandboxAllows({ id: "sb-000000000003", state: "running" }, "connect")).not.toThrow();
  });
});

describe("the sandbox table in SQL", () => {
  // The conditions the store's atomic queries (pool hand-out, expiry) are built from select exactly the allowed rows.
  const db = new Database(":memory:");
  db.exec("CREATE TABLE sandboxes (id TEXT, state TEXT, health TEXT)");
  const rows = [
    { id: "starting", state: "starting", health: null },
    { id: "running", state: "running", health: null },
    { id: "unhealthy", state: "running", health: "unhealthy" },
  ] as const;
  for (const r of rows) db.prepare("INSERT INTO sandboxes VALUES (?, ?, ?)").run(r.id, r.state, r.health);

  it.each(SANDBOX_OPS)("%s selects the rows the table allows", (op) => {
    const selected = (db.prepare(`SELECT id FROM sandboxes WHERE ${sandboxRowsAllowing(op)}`).all() as { id: string }[]).map((r) => r.id);
    const expected = rows.filter((r) => sandboxAllows(sandboxState(r), op)).map((r) => r.id);
    expect(selected.sort()).toEqual(expected.sort());
  });
});

describe("the snapshot table", () => {
  it("has a decision for every state and operation", () => {
    expect(Object.keys(SNAPSHOT_RULES).sort()).toEqual([...SNAPSHOT_STATES].sort());
    for (const state of SNAPSHOT_STATES) expect(Object.keys(SNAPSHOT_RULES[state]).sort()).toEqual([...SNAPSHOT_OPS].sort());
  });

  it("uses only ready snapshots; a tag is taken while written or ready, free when absent or failed", () => {
    expect(SNAPSHOT_STATES.filter((s) => snapshotAllows(s, "use"))).toEqual(["ready"]);
    expect(SNAPSHOT_STATES.filter((s) => snapshotAllows(s, "create"))).toEqual(["absent", "failed"]);
    expect(claimableBranchStatuses()).toEqual(["failed"]);
  });

  it("a committed manifest is ready whatever the BRANCH row says; a ready row without one is absent", () => {
    expect(snapshotStateOf(true, { status: "writing" })).toBe("ready");
    expect(snapshotStateOf(false, { status: "writing" })).toBe("writing");
    expect(snapshotStateOf(false, { status: "failed" })).toBe("failed");
    expect(snapshotStateOf(false, { status: "ready" })).toBe("absent");
    expect(snapshotStateOf(false, undefined)).toBe("absent");
  });

  it("names the state, the operation and what to do", () => {
    const writing = refusal(() => assertSnapshotAllows("t1", "writing", "use", { source_id: "sb-000000000004" }));
    expect(writing.code).toBe("conflict");
    expect(writing.message).toBe(
      "snapshot t1 is still being written by a BRANCH of sb-000000000004, so it cannot be used: wait until its status is ready",
    );
    const failed = refusal(() => assertSnapshotAllows("t2", "failed", "use", { error: "QEMU exited" }));
    expect(failed.code).toBe("snapshot_not_found");
    expect(failed.message).toContain("its BRANCH failed (QEMU exited)");
    expect(refusal(() => assertSnapshotAllows("t3", "absent", "use")).message).toBe("no snapshot t3; `forkd images` lists them");
    expect(refusal(() => assertSnapshotAllows("t4", "ready", "create")).message).toMatch(/snapshot t4 already exists.*forkd rmi/);
  });
});

describe("the workspace table", () => {
  it("has a decision for every state and operation", () => {
    expect(Object.keys(WORKSPACE_RULES).sort()).toEqual([...WORKSPACE_STATES].sort());
    for (const state of WORKSPACE_STATES) expect(Object.keys(WORKSPACE_RULES[state]).sort()).toEqual([...WORKSPACE_OPS].sort());
  });

  it("suspends only a running one, resumes any other; a running one without a sandbox is stale", () => {
    expect(WORKSPACE_STATES.filter((s) => workspaceAllows(s, "suspend"))).toEqual(["running"]);
    expect(WORKSPACE_STATES.filter((s) => workspaceAllows(s, "resume"))).toEqual(["suspended", "stale"]);
    expect(workspaceState({ status: "running", sandbox_id: null })).toBe("stale");
    expect(workspaceState({ status: "running", sandbox_id: "sb-000000000005" })).toBe("running");
  });

  it("refuses with 400 and says what to do", () => {
    const twice = refusal(() => assertWorkspaceAllows({ name: "w", status: "suspended", sandbox_id: null }, "suspend"));
    expect(twice.code).toBe("bad_request");
    expect(twice.message).toBe("workspace w is suspended, not running: suspend needs its live sandbox (resume it first)");
    const running = refusal(() => assertWorkspaceAllows({ name: "w", status: "running", sandbox_id: "sb-000000000006" }, "resume"));
    expect(running.details).toMatchObject({ name: "w", status: "running", op: "resume", sandbox_id: "sb-000000000006" });
  });
});
