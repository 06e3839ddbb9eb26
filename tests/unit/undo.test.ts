// The teardown stack fork, boot and BRANCH unwind on failure: every step runs,
// newest first, even when one throws, and what failed is reported, never hidden.
import { ForkdError, UndoStack, withTeardownFailures } from "@forkd/core";
import { describe, expect, it } from "vitest";

describe("UndoStack", () => {
  it("undoes newest first, and a step that throws does not stop the ones after it", async () => {
    const ran: string[] = [];
    const undo = new UndoStack();
    undo.push("remove the runtime dir", () => {
      ran.push("dir");
    });
    undo.push("remove the row", async () => {
      ran.push("row");
      throw new Error("database is locked");
    });
    undo.push("kill the VMM", async () => {
      ran.push("vmm");
    });
    const failures = await undo.unwind();
    expect(ran).toEqual(["vmm", "row", "dir"]);
    expect(failures.map((f) => f.step)).toEqual(["remove the row"]);
    expect((failures[0]!.error as Error).message).toBe("database is locked");
    expect(undo.pending).toEqual([]);
  });

  it("reports every failing step, in the order they ran", async () => {
    const undo = new UndoStack();
    undo.push("first pushed", () => {
      throw new Error("a");
    });
    undo.push("second pushed", () => {
      throw new Error("b");
    });
    expect((await undo.unwind()).map((f) => f.step)).toEqual(["second pushed", "first pushed"]);
  });

  it("undoes nothing after commit", async () => {
    let ran = false;
    const undo = new UndoStack();
    undo.push("kill the VMM", () => {
      ran = true;
    });
    undo.commit();
    expect(await undo.unwind()).toEqual([]);
    expect(ran).toBe(false);
  });

  it("a step done early runs once and is not undone again", async () => {
    let closes = 0;
    const undo = new UndoStack();
    const closeNow = undo.push("close the stream fd", () => {
      closes++;
    });
    await closeNow();
    await closeNow();
    expect(undo.pending).toEqual([]);
    await undo.unwind();
    expect(closes).toBe(1);
  });

  it("rollback hands back the original error when the teardown went clean", async () => {
    const undo = new UndoStack();
    undo.push("remove the runtime dir", () => {});
    const err = new ForkdError("vm_start_failed", "QEMU exited");
    expect(await undo.rollback(err)).toBe(err);
  });

  it("rollback keeps the code and names what the teardown could not undo", async () => {
    const undo = new UndoStack();
    undo.push("remove the cgroup", () => {
      throw new Error("EBUSY");
    });
    const reported = await undo.rollback(new ForkdError("vm_timeout", "no answer"));
    expect(reported).toBeInstanceOf(ForkdError);
    const e = reported as ForkdError;
    expect(e.code).toBe("vm_timeout");
    expect(e.message).toContain("no answer");
    expect(e.message).toContain("remove the cgroup: EBUSY");
    expect(e.details.teardown_failed).toEqual(["remove the cgroup"]);
  });

  it("a plain error with teardown failures becomes an AggregateError carrying both", () => {
    const original = new Error("boom");
    const out = withTeardownFailures(original, [{ step: "kill the VMM", error: new Error("ESRCH") }]) as AggregateError;
    expect(out).toBeInstanceOf(AggregateError);
    expect(out.errors[0]).toBe(original);
    expect(out.message).toContain("kill the VMM: ESRCH");
  });
});
