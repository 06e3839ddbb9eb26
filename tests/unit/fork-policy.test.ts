// The fork policy (core's sandbox/fork-policy.ts), with its steps passed in: a
// "host" here is a set of running children, a restore starts them one by one and
// fails at child k, and the reservation is a real admission ledger's. What is
// checked is what the daemon and the CLI both promise: all children or none, the
// reservation held until the rollback is over, the first cause reported.
import {
  AdmissionLedger,
  allOrNothing,
  type Capacity,
  defaultLimits,
  type ForkChildResult,
  ForkdError,
  faultPoint,
  forkNeeds,
} from "@forkd/core";
import { describe, expect, it } from "vitest";

const MIB = 2 ** 20;
const GIB = 1024 * MIB;
const CAPACITY: Capacity = {
  memAvailableBytes: 16 * GIB,
  memTotalBytes: 16 * GIB,
  shmFreeBytes: 8 * GIB,
  shmEvictableBytes: 0,
  sandboxesAlive: 0,
};

/** A host of running children, and every step the policy took, in order. */
function fakeHost(opts: { held?: string[]; maxSandboxes?: number } = {}) {
  const running = new Set<string>(opts.held ?? []);
  const log: string[] = [];
  const ledger = new AdmissionLedger(defaultLimits({ memTotalBytes: 16 * GIB, maxSandboxes: opts.maxSandboxes ?? 1000 }));
  const reserve = (n: number) => async () => {
    const verdict = ledger.admit(forkNeeds({ n, guestMemoryBytes: 256 * MIB, unstagedBytes: 0, dirtyFraction: 0.25 }), CAPACITY);
    if (!verdict.ok) throw new ForkdError("over_limit", verdict.refusal.message);
    log.push(`reserve ${n}`);
    return {
      release: () => {
        log.push("release");
        verdict.ticket.release();
      },
    };
  };
  /** Start n children in turn; those in `failAt` fail (and, like restoreChild, leave nothing running). */
  const restore =
    (n: number, failAt: number[] = []) =>
    async (): Promise<ForkChildResult[]> => {
      const results: ForkChildResult[] = [];
      for (let i = 0; i < n; i++) {
        const id = `c${i}`;
        if (failAt.includes(i)) {
          log.push(`fail ${id}`);
          results.push({ ok: false, id, error: { code: "vm_start_failed", message: `child ${i} broke` } });
          continue;
        }
        running.add(id);
        log.push(`start ${id}`);
        results.push({ ok: true, id, pid: 1000 + i, timings: { vmmStartMs: 1, restoreMs: 1, firstAnswerMs: 1, totalMs: 3 } });
      }
      return results;
    };
  const killChild = async (id: string) => {
    // What the reservation still holds while each child is killed: it must not be given back before.
    log.push(`kill ${id} (reserved ${ledger.reserved().sandboxes})`);
    if (!running.delete(id)) throw new Error(`killed ${id}, which was not running`);
  };
  return { running, log, ledger, reserve, restore, killChild };
}

describe("a fork of N children is all or nothing", () => {
  it("keeps every child when all start, and holds the reservation until released", async () => {
    const host = fakeHost();
    const { result, release } = await allOrNothing({
      reserve: host.reserve(3),
      restore: host.restore(3),
      children: (r) => r,
      killChild: host.killChild,
    });
    expect(result.map((c) => c.id)).toEqual(["c0", "c1", "c2"]);
    expect([...host.running]).toEqual(["c0", "c1", "c2"]);
    expect(host.ledger.reserved().sandboxes).toBe(3);
    release();
    release();
    expect(host.ledger.reserved().sandboxes).toBe(0);
    expect(host.log).toEqual(["reserve 3", "start c0", "start c1", "start c2", "release"]);
  });

  for (const k of [0, 2, 4]) {
    it(`kills every child that started when child ${k} of 5 fails, then releases, and names child ${k}`, async () => {
      const host = fakeHost();
      const error = await allOrNothing({
        reserve: host.reserve(5),
        restore: host.restore(5, [k]),
        children: (r) => r,
        killChild: host.killChild,
      }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(ForkdError);
      const e = error as ForkdError;
      expect(e.code).toBe("vm_start_failed");
      expect(e.message).toBe(`1 of 5 children could not be restored, so none were kept: child ${k} broke`);
      expect(e.details.failures).toEqual([{ id: `c${k}`, code: "vm_start_failed", message: `child ${k} broke` }]);
      expect(host.running.size).toBe(0);
      expect(host.ledger.reserved()).toMatchObject({ sandboxes: 0, memoryBytes: 0 });
      const started = [0, 1, 2, 3, 4].filter((i) => i !== k).map((i) => `c${i}`);
      // Killed in the order started, each while the reservation still held all 5, and released last.
      expect(host.log.slice(-5)).toEqual([...started.map((id) => `kill ${id} (reserved 5)`), "release"]);
    });
  }

  it("reports the first failed child as the cause, and counts every failure", async () => {
    const host = fakeHost();
    const e = (await allOrNothing({ restore: host.restore(4, [3, 1]), children: (r) => r, killChild: host.killChild }).catch(
      (err: unknown) => err,
    )) as ForkdError;
    expect(e.message).toBe("2 of 4 children could not be restored, so none were kept: child 1 broke");
    expect((e.details.failures as { id: string }[]).map((f) => f.id)).toEqual(["c1", "c3"]);
    expect(host.running.size).toBe(0);
  });

  it("kills the children the request already held (a hot pool's) with its own, and counts them in the total", async () => {
    const host = fakeHost({ held: ["p0", "p1"] });
    const e = (await allOrNothing({
      restore: host.restore(2, [1]),
      children: (r) => r,
      held: ["p0", "p1"],
      killChild: host.killChild,
    }).catch((err: unknown) => err)) as ForkdError;
    expect(e.message).toMatch(/^1 of 4 children could not be restored/);
    expect(host.running.size).toBe(0);
    expect(host.log.filter((l) => l.startsWith("kill")).map((l) => l.split(" ")[1])).toEqual(["p0", "p1", "c0"]);
  });

  it("on a refusal starts nothing, gives back what the request held, and rethrows the refusal", async () => {
    const host = fakeHost({ held: ["p0"], maxSandboxes: 2 });
    let restored = false;
    const e = (await allOrNothing({
      reserve: host.reserve(3),
      restore: async () => {
        restored = true;
        return [];
      },
      children: (r: ForkChildResult[]) => r,
      held: ["p0"],
      killChild: host.killChild,
    }).catch((err: unknown) => err)) as ForkdError;
    expect(e.code).toBe("over_limit");
    expect(restored).toBe(false);
    expect(host.running.size).toBe(0);
    expect(host.ledger.reserved().sandboxes).toBe(0);
  });

  it("when the restore itself throws (no snapshot, say), releases and rethrows that very error", async () => {
    const host = fakeHost({ held: ["p0"] });
    const cause = new ForkdError("snapshot_not_found", "no snapshot nope");
    const e = await allOrNothing({
      reserve: host.reserve(2),
      restore: async (): Promise<ForkChildResult[]> => {
        throw cause;
      },
      children: (r) => r,
      held: ["p0"],
      killChild: host.killChild,
    }).catch((err: unknown) => err);
    expect(e).toBe(cause);
    expect(host.running.size).toBe(0);
    expect(host.ledger.reserved().sandboxes).toBe(0);
    expect(host.log.at(-1)).toBe("release");
  });

  it("goes on killing when one kill fails, undoes the rest after the children, and lists what could not be undone", async () => {
    const host = fakeHost();
    const killChild = async (id: string) => {
      if (id === "c0") throw new Error("c0 would not die");
      await host.killChild(id);
    };
    const e = (await allOrNothing({
      reserve: host.reserve(4),
      restore: host.restore(4, [2]),
      children: (r) => r,
      killChild,
      undo: async () => {
        host.log.push("undo");
        throw new Error("capture already gone");
      },
    }).catch((err: unknown) => err)) as ForkdError;
    expect(e.message).toMatch(/^1 of 4 children could not be restored, so none were kept: child 2 broke$/);
    expect(e.details.rollback_failures).toEqual([
      { id: "c0", message: "c0 would not die" },
      { message: "undoing the fork failed: capture already gone" },
    ]);
    expect([...host.running]).toEqual(["c0"]);
    expect(host.log.slice(-4)).toEqual(["kill c1 (reserved 4)", "kill c3 (reserved 4)", "undo", "release"]);
    expect(host.ledger.reserved().sandboxes).toBe(0);
  });
});

describe("the fault hook that fails one child (integration tests use it)", () => {
  it("throws at the Nth time a step is reached with STEP@N:fail, and only then", () => {
    process.env.FORKD_FAULT = "fork.row-written@2:fail";
    try {
      expect(() => faultPoint("fork.row-written")).not.toThrow();
      expect(() => faultPoint("fork.row-written")).toThrow(/injected failure at fork\.row-written@2 \(FORKD_FAULT\)/);
      expect(() => faultPoint("fork.row-written")).not.toThrow();
      expect(() => faultPoint("fork.launched")).not.toThrow();
    } finally {
      delete process.env.FORKD_FAULT;
    }
  });
});
