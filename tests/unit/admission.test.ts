// Admission planning: what work needs against what the host has, and a ledger
// whose check and reservation are one step. Pure: figures in, verdicts out.
import {
  AdmissionLedger,
  branchNeeds,
  type Capacity,
  decide,
  defaultLimits,
  forkNeeds,
  liveForkNeeds,
  NO_NEEDS,
  parseMemInfo,
  refusalError,
  snapshotNeeds,
  VMM_OVERHEAD_BYTES,
} from "@forkd/core";
import { describe, expect, it } from "vitest";

const MIB = 2 ** 20;
const GIB = 1024 * MIB;

const limits = defaultLimits({
  maxSandboxes: 10,
  maxBranches: 2,
  memTotalBytes: 16 * GIB,
  memoryHeadroomBytes: 512 * MIB,
  shmHeadroomBytes: 0,
});
const roomy: Capacity = {
  memAvailableBytes: 8 * GIB,
  memTotalBytes: 16 * GIB,
  shmFreeBytes: 8 * GIB,
  shmEvictableBytes: 0,
  sandboxesAlive: 0,
};

describe("what work needs", () => {
  it("reads MemTotal and MemAvailable from /proc/meminfo", () => {
    const text = "MemTotal:       24684176 kB\nMemFree:        19987012 kB\nMemAvailable:   22075556 kB\nBuffers: 1 kB\n";
    expect(parseMemInfo(text)).toEqual({ memTotalBytes: 24684176 * 1024, memAvailableBytes: 22075556 * 1024 });
    expect(() => parseMemInfo("MemTotal: 1 kB\n")).toThrow(/MemAvailable/);
  });

  it("counts a fork's shared image once and each child's VMM plus the RAM it may write", () => {
    const staged = forkNeeds({ n: 10, guestMemoryBytes: 256 * MIB, unstagedBytes: 0, dirtyFraction: 0.25 });
    expect(staged.memoryBytes).toBe(10 * (VMM_OVERHEAD_BYTES + 64 * MIB));
    expect(staged.shmBytes).toBe(0);
    expect(staged.sandboxes).toBe(10);
    const unstaged = forkNeeds({ n: 10, guestMemoryBytes: 256 * MIB, unstagedBytes: 256 * MIB, dirtyFraction: 0.25 });
    expect(unstaged.memoryBytes - staged.memoryBytes).toBe(256 * MIB);
    expect(unstaged.shmBytes).toBe(256 * MIB);
    // Children map a sealed memfd copy of the staged image: made once, memory, not room on FORKD_SHM_DIR.
    const unsealed = forkNeeds({ n: 10, guestMemoryBytes: 256 * MIB, unstagedBytes: 0, unsealedBytes: 256 * MIB, dirtyFraction: 0.25 });
    expect(unsealed.memoryBytes - staged.memoryBytes).toBe(256 * MIB);
    expect(unsealed.shmBytes).toBe(0);
    expect(unsealed.why).toMatch(/256 MiB for its sealed copy/);
    // The worst case, asked for: every page written.
    expect(forkNeeds({ n: 1, guestMemoryBytes: 256 * MIB, unstagedBytes: 0, dirtyFraction: 1 }).memoryBytes).toBe(
      VMM_OVERHEAD_BYTES + 256 * MIB,
    );
  });

  it("counts a child with a memory limit at its limit, never above its whole RAM and VMM", () => {
    expect(forkNeeds({ n: 2, guestMemoryBytes: 256 * MIB, memoryLimitMib: 100, unstagedBytes: 0, dirtyFraction: 0.25 }).memoryBytes).toBe(
      200 * MIB,
    );
    expect(
      forkNeeds({ n: 1, guestMemoryBytes: 256 * MIB, memoryLimitMib: 100_000, unstagedBytes: 0, dirtyFraction: 0.25 }).memoryBytes,
    ).toBe(256 * MIB + VMM_OVERHEAD_BYTES);
    expect(forkNeeds({ n: 1, guestMemoryBytes: 256 * MIB, memoryLimitMib: -5, unstagedBytes: 0, dirtyFraction: 0.25 }).memoryBytes).toBe(0);
  });

  it("puts a snapshot parent's RAM and a BRANCH's stream and image on shmem", () => {
    const snap = snapshotNeeds(1024);
    expect(snap.shmBytes).toBe(GIB);
    expect(snap.memoryBytes).toBe(GIB + VMM_OVERHEAD_BYTES);
    const branch = branchNeeds(GIB);
    expect(branch.shmBytes).toBeGreaterThan(2 * GIB);
    expect(branch.memoryBytes).toBe(branch.shmBytes + VMM_OVERHEAD_BYTES);
    expect(branch.branches).toBe(1);
  });
  it("counts a live fork as its children (the image is staged: the source maps it) plus its capture in memory and on shmem", () => {
    const guest = 512 * MIB;
    const children = forkNeeds({ n: 3, guestMemoryBytes: guest, unstagedBytes: 0, dirtyFraction: 0.25 });
    const live = liveForkNeeds({ n: 3, guestMemoryBytes: guest, dirtyFraction: 0.25 });
    expect(live).toMatchObject({
      memoryBytes: children.memoryBytes + guest,
      shmBytes: guest,
      sandboxes: 3,
      branches: 1,
    });
    expect(live.why).toMatch(/3 × .* per child.* \+ a 512 MiB capture$/);
  });
});

describe("the verdict", () => {
  it("admits what fits and refuses what does not, naming the resource", () => {
    expect(decide(snapshotNeeds(1024), roomy, NO_NEEDS, limits)).toEqual({ ok: true, evictBytes: 0 });
    const huge = decide(snapshotNeeds(64 * 1024), roomy, NO_NEEDS, limits);
    expect(huge.ok).toBe(false);
    if (!huge.ok) {
      expect(huge.refusal.resource).toBe("memory");
      expect(huge.refusal.message).toMatch(/needs up to 64\.0 GiB of host memory/);
      expect(huge.refusal.availableBytesOrCount).toBe(8 * GIB - 512 * MIB);
    }
    // Plenty of RAM but a small staging filesystem: shm is what is short.
    const smallShm = decide(snapshotNeeds(1024), { ...roomy, shmFreeBytes: 512 * MIB }, NO_NEEDS, limits);
    expect(smallShm.ok ? undefined : smallShm.refusal.resource).toBe("shm");
    const tooMany = decide(
      forkNeeds({ n: 4, guestMemoryBytes: 128 * MIB, unstagedBytes: 0, dirtyFraction: 0.25 }),
      { ...roomy, sandboxesAlive: 7 },
      NO_NEEDS,
      limits,
    );
    expect(tooMany.ok ? undefined : tooMany.refusal.resource).toBe("sandboxes");
    const branches = decide(branchNeeds(128 * MIB), roomy, { ...NO_NEEDS, branches: 2 }, limits);
    expect(branches.ok ? undefined : branches.refusal.resource).toBe("branches");
  });

  it("counts idle staged images as room, and says how much to evict", () => {
    const tight: Capacity = { ...roomy, shmFreeBytes: 256 * MIB, shmEvictableBytes: 2 * GIB };
    const v = decide(snapshotNeeds(1024), tight, NO_NEEDS, limits);
    expect(v).toEqual({ ok: true, evictBytes: GIB - 256 * MIB });
    // Memory short by more than the need (MemAvailable below the headroom): evict past the need.
    const low: Capacity = { ...roomy, memAvailableBytes: 256 * MIB, shmEvictableBytes: 4 * GIB };
    const w = decide(snapshotNeeds(128), low, NO_NEEDS, limits);
    expect(w.ok && w.evictBytes).toBe(128 * MIB + VMM_OVERHEAD_BYTES + 256 * MIB);
  });

  it("becomes a 503 over_limit naming the resource and when to retry", () => {
    const v = decide(snapshotNeeds(64 * 1024), roomy, NO_NEEDS, limits);
    if (v.ok) throw new Error("admitted");
    const err = refusalError(v.refusal);
    expect(err.code).toBe("over_limit");
    expect(err.httpStatus).toBe(503);
    expect(err.details).toMatchObject({ resource: "memory", retry_after_s: 10 });
  });
});

describe("the ledger", () => {
  it("reserves as it admits: the second of two that fit only alone is refused, until the first releases", () => {
    const ledger = new AdmissionLedger(limits);
    const needs = forkNeeds({ n: 6, guestMemoryBytes: 128 * MIB, unstagedBytes: 0, dirtyFraction: 0.25 });
    const first = ledger.admit(needs, roomy);
    const second = ledger.admit(needs, roomy);
    expect(first.ok).toBe(true);
    expect(second.ok ? undefined : second.refusal.resource).toBe("sandboxes");
    expect(second.ok ? "" : second.refusal.message).toMatch(/6 are being started/);
    if (first.ok) {
      first.ticket.release();
      first.ticket.release();
    }
    expect(ledger.reserved()).toMatchObject({ memoryBytes: 0, shmBytes: 0, sandboxes: 0, branches: 0 });
    expect(ledger.admit(needs, roomy).ok).toBe(true);
  });

  it("holds memory for work in flight that the host does not show yet", () => {
    const ledger = new AdmissionLedger(limits);
    const capacity: Capacity = { ...roomy, memAvailableBytes: 3 * GIB };
    expect(ledger.admit(snapshotNeeds(1024), capacity).ok).toBe(true);
    expect(ledger.admit(snapshotNeeds(1024), capacity).ok).toBe(true);
    const third = ledger.admit(snapshotNeeds(1024), capacity);
    expect(third.ok ? undefined : third.refusal.resource).toBe("memory");
    expect(third.ok ? "" : third.refusal.message).toMatch(/held by work in progress/);
  });

  it("never lets two admissions count on evicting the same idle images", () => {
    const ledger = new AdmissionLedger(limits);
    const capacity: Capacity = { ...roomy, shmFreeBytes: 0, shmEvictableBytes: 1536 * MIB };
    const first = ledger.admit(snapshotNeeds(1024), capacity);
    expect(first.ok && first.evictBytes).toBe(GIB);
    const second = ledger.admit(snapshotNeeds(1024), capacity);
    expect(second.ok ? undefined : second.refusal.resource).toBe("shm");
    // Once evicted, the room shows on the host (held by the first) and the claim is dropped: the rest is free again.
    if (first.ok) first.ticket.evicted();
    const evicted: Capacity = { ...capacity, shmFreeBytes: GIB, shmEvictableBytes: 512 * MIB };
    expect(ledger.admit(snapshotNeeds(768), evicted).ok).toBe(false);
    expect(ledger.admit(snapshotNeeds(512), evicted).ok).toBe(true);
  });
});
