// Admission control, the pure part: what a fork, a snapshot or a BRANCH needs at
// most, against what the host has and what work in flight already holds. The
// ledger checks and reserves in one synchronous step, so two requests in the same
// event-loop turn can never both take the last of something. Reading the host
// (/proc/meminfo, statfs) is admission-host.ts; nothing here does I/O.
import { ForkdError } from "../common/errors.js";
import { SETTINGS } from "../common/settings.js";

const MIB = 2 ** 20;

/** What one QEMU costs beyond its guest's RAM (binary, TCG translation cache, device buffers): ≈36-44 MiB measured. */
export const VMM_OVERHEAD_BYTES = 40 * MIB;

/** A migration stream carries every RAM page plus device state and framing; this covers the latter. */
const CAPTURE_STREAM_SLACK_BYTES = 64 * MIB;

/**
 * How much of its guest RAM a child without a memory limit is counted as writing.
 * Pages a child only reads stay shared with the staged image (counted once, when
 * staged); only the pages it writes become its own. 1 counts the worst case.
 */
const DEFAULT_DIRTY_FRACTION = SETTINGS.admitDirtyFraction.default;

type Resource = "memory" | "shm" | "sandboxes" | "branches";

export type Needs = {
  /** Host RAM, shmem included: a file on /dev/shm is memory too. */
  memoryBytes: number;
  /** Bytes written to the staging filesystem (FORKD_SHM_DIR). */
  shmBytes: number;
  sandboxes: number;
  branches: number;
  /** Shown in a refusal: what the figures are made of. */
  why: string;
};

export const NO_NEEDS: Needs = { memoryBytes: 0, shmBytes: 0, sandboxes: 0, branches: 0, why: "" };

/** The host as read just now. */
export type Capacity = {
  /** MemAvailable from /proc/meminfo. */
  memAvailableBytes: number;
  memTotalBytes: number;
  /** Free bytes on the staging filesystem (statfs f_bavail). */
  shmFreeBytes: number;
  /** Staged images that may be evicted to make room: idle (no live child, no work using them). */
  shmEvictableBytes: number;
  sandboxesAlive: number;
};

export type Limits = {
  maxSandboxes: number;
  maxBranches: number;
  /** Host memory admission never hands out: the host and its other processes need some. */
  memoryHeadroomBytes: number;
  shmHeadroomBytes: number;
  dirtyFraction: number;
};

export type Refusal = {
  resource: Resource;
  needBytesOrCount: number;
  availableBytesOrCount: number;
  retryAfterS: number;
  message: string;
};

export type Verdict = { ok: true; evictBytes: number } | { ok: false; refusal: Refusal };

/** Seconds a refused client should wait: slots free when work finishes, memory and shm when sandboxes exit or images are evicted. */
const RETRY_AFTER_S: Record<Resource, number> = { sandboxes: 5, branches: 2, memory: 10, shm: 10 };

export function defaultLimits(opts: Partial<Limits> & { memTotalBytes: number }): Limits {
  return {
    maxSandboxes: opts.maxSandboxes ?? 1000,
    maxBranches: opts.maxBranches ?? 4,
    // 5% of RAM, at least 256 MiB and at most 2 GiB: room for the daemon, the host's page cache and its other work.
    memoryHeadroomBytes: opts.memoryHeadroomBytes ?? Math.min(2048 * MIB, Math.max(256 * MIB, Math.round(opts.memTotalBytes * 0.05))),
    shmHeadroomBytes: opts.shmHeadroomBytes ?? 16 * MIB,
    dirtyFraction: opts.dirtyFraction ?? DEFAULT_DIRTY_FRACTION,
  };
}

/** MemTotal and MemAvailable (bytes) from the text of /proc/meminfo. */
export function parseMemInfo(text: string): { memTotalBytes: number; memAvailableBytes: number } {
  const kib = (field: string): number => {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text);
    if (!m) throw new ForkdError("internal", `/proc/meminfo has no ${field} line`);
    return Number(m[1]) * 1024;
  };
  return { memTotalBytes: kib("MemTotal"), memAvailableBytes: kib("MemAvailable") };
}

/**
 * A fork of `n` children: each its VMM plus the guest memory it may write (all of
 * it up to its memory limit when it has one, since the cgroup caps it there; a
 * fraction otherwise), and, when the snapshot is not staged yet, its memory image
 * (and those of unstaged ancestors a layer is assembled from) on shmem, once, and
 * the sealed memfd copy children map (store/sealed-images.ts) when it does not exist
 * yet: memory, not room on FORKD_SHM_DIR.
 */
export function forkNeeds(opts: {
  n: number;
  guestMemoryBytes: number;
  memoryLimitMib?: number | undefined;
  unstagedBytes: number;
  /** The image's size when its sealed copy is still to be made, else 0. */
  unsealedBytes?: number;
  dirtyFraction: number;
}): Needs {
  const unsealed = Math.max(0, opts.unsealedBytes ?? 0);
  const perChild = Math.max(
    0,
    opts.memoryLimitMib !== undefined
      ? Math.min(opts.memoryLimitMib * MIB, VMM_OVERHEAD_BYTES + opts.guestMemoryBytes)
      : VMM_OVERHEAD_BYTES + Math.ceil(opts.guestMemoryBytes * opts.dirtyFraction),
  );
  return {
    memoryBytes: opts.n * perChild + opts.unstagedBytes + unsealed,
    shmBytes: opts.unstagedBytes,
    sandboxes: opts.n,
    branches: 0,
    why:
      `${opts.n} × ${mib(perChild)} per child` +
      (opts.unstagedBytes > 0 ? ` + ${mib(opts.unstagedBytes)} memory image to stage` : ", image already staged") +
      (unsealed > 0 ? ` + ${mib(unsealed)} for its sealed copy` : ""),
  };
}

/**
 * A live fork-to-many of a running sandbox with `guestMemoryBytes` of RAM: its `n`
 * children (the image they map is staged already: the source maps it), plus the
 * capture, whose pages sit in memory while copied and whose memory image sits on
 * shmem until it is registered as a snapshot.
 */
export function liveForkNeeds(opts: { n: number; guestMemoryBytes: number; dirtyFraction: number }): Needs {
  const children = forkNeeds({ n: opts.n, guestMemoryBytes: opts.guestMemoryBytes, unstagedBytes: 0, dirtyFraction: opts.dirtyFraction });
  const capture: Needs = { memoryBytes: opts.guestMemoryBytes, shmBytes: opts.guestMemoryBytes, sandboxes: 0, branches: 1, why: "" };
  return { ...addNeeds(children, capture), why: `${children.why} + a ${mib(opts.guestMemoryBytes)} capture` };
}

/** A warm snapshot: the parent's RAM is a file on shmem that may fill to its size, plus its VMM. */
export function snapshotNeeds(memoryMib: number): Needs {
  const ram = memoryMib * MIB;
  return {
    memoryBytes: ram + VMM_OVERHEAD_BYTES,
    shmBytes: ram,
    sandboxes: 0,
    branches: 0,
    why: `a ${mib(ram)} parent on shmem + its VMM`,
  };
}

/**
 * A BRANCH: the capture stream and the new memory image both live on shmem until
 * the snapshot is registered, and a materialiser QEMU loads one into the other.
 */
export function branchNeeds(guestMemoryBytes: number): Needs {
  const stream = guestMemoryBytes + CAPTURE_STREAM_SLACK_BYTES;
  return {
    memoryBytes: stream + guestMemoryBytes + VMM_OVERHEAD_BYTES,
    shmBytes: stream + guestMemoryBytes,
    sandboxes: 0,
    branches: 1,
    why: `a ${mib(stream)} capture stream + a ${mib(guestMemoryBytes)} memory image + a materialiser VMM`,
  };
}

function addNeeds(a: Needs, b: Needs): Needs {
  return {
    memoryBytes: a.memoryBytes + b.memoryBytes,
    shmBytes: a.shmBytes + b.shmBytes,
    sandboxes: a.sandboxes + b.sandboxes,
    branches: a.branches + b.branches,
    why: a.why,
  };
}

/**
 * Does `needs` fit beside what is `reserved` by work in flight? Evictable staged
 * images count as room (both for shmem and memory: they are shmem), and the
 * verdict says how much must be evicted before the work starts.
 */
export function decide(needs: Needs, capacity: Capacity, reserved: Needs, limits: Limits): Verdict {
  if (needs.sandboxes > 0) {
    const have = capacity.sandboxesAlive + reserved.sandboxes;
    if (have + needs.sandboxes > limits.maxSandboxes) {
      return refuse(
        "sandboxes",
        needs.sandboxes,
        Math.max(0, limits.maxSandboxes - have),
        `${capacity.sandboxesAlive} sandboxes run${reserved.sandboxes ? ` and ${reserved.sandboxes} are being started` : ""}; ${needs.sandboxes} more would pass this daemon's limit of ${limits.maxSandboxes}: kill some or raise --max-sandboxes`,
      );
    }
  }
  if (needs.branches > 0 && reserved.branches + needs.branches > limits.maxBranches) {
    return refuse(
      "branches",
      needs.branches,
      Math.max(0, limits.maxBranches - reserved.branches),
      `${reserved.branches} BRANCHes are in progress, the limit is ${limits.maxBranches} (--max-branches); retry shortly`,
    );
  }
  const evictable = Math.max(0, capacity.shmEvictableBytes);
  const memFree = capacity.memAvailableBytes - limits.memoryHeadroomBytes - reserved.memoryBytes;
  if (needs.memoryBytes > memFree + evictable) {
    return refuse(
      "memory",
      needs.memoryBytes,
      Math.max(0, memFree + evictable),
      `this needs up to ${mib(needs.memoryBytes)} of host memory (${needs.why}); ${mib(Math.max(0, memFree + evictable))} is free for it ` +
        `(MemAvailable ${mib(capacity.memAvailableBytes)}${evictable ? ` + ${mib(evictable)} of idle staged images` : ""}, ` +
        `less ${mib(reserved.memoryBytes)} held by work in progress and ${mib(limits.memoryHeadroomBytes)} kept for the host)`,
    );
  }
  const shmFree = capacity.shmFreeBytes - limits.shmHeadroomBytes - reserved.shmBytes;
  if (needs.shmBytes > shmFree + evictable) {
    return refuse(
      "shm",
      needs.shmBytes,
      Math.max(0, shmFree + evictable),
      `this writes up to ${mib(needs.shmBytes)} to the staging filesystem (${needs.why}); ${mib(Math.max(0, shmFree + evictable))} is free there ` +
        `(${mib(Math.max(0, capacity.shmFreeBytes))} free${evictable ? ` + ${mib(evictable)} of idle staged images` : ""}, ` +
        `less ${mib(reserved.shmBytes)} held by work in progress): remove snapshots, kill sandboxes or give FORKD_SHM_DIR more room`,
    );
  }
  // What fits only with evicted images: evict the larger shortfall (memFree may be negative, so more than the need).
  return { ok: true, evictBytes: Math.max(0, needs.memoryBytes - memFree, needs.shmBytes - shmFree) };
}

function refuse(resource: Resource, need: number, available: number, message: string): Verdict {
  return {
    ok: false,
    refusal: { resource, needBytesOrCount: need, availableBytesOrCount: available, retryAfterS: RETRY_AFTER_S[resource], message },
  };
}

/** The 503 a refusal leaves as: the resource that is short and when to try again. */
export function refusalError(refusal: Refusal): ForkdError {
  return new ForkdError("over_limit", refusal.message, {
    resource: refusal.resource,
    retry_after_s: refusal.retryAfterS,
    need: refusal.needBytesOrCount,
    available: refusal.availableBytesOrCount,
  });
}

export type Ticket = {
  readonly needs: Needs;
  /** Give back what was reserved (idempotent). */
  release: () => void;
  /** Give back the eviction claim once the images are gone (their room now shows on the host). */
  evicted: () => void;
};

/**
 * The work in flight of one daemon. `admit` checks and reserves in the same
 * synchronous call: whatever runs next sees the reservation.
 */
export class AdmissionLedger {
  private held: Needs = { ...NO_NEEDS };
  /** Idle staged images some admitted work counts on evicting, not yet evicted. */
  private evictionClaims = 0;

  constructor(readonly limits: Limits) {}

  reserved(): Needs {
    return { ...this.held };
  }

  /**
   * The largest count `needsOf(count)` admits now (0 when not even one fits), by the
   * same verdict `admit` gives; needs grow with the count, so a binary search finds it.
   * Nothing is reserved: a cluster asks each node this before placing a fork there.
   */
  room(needsOf: (count: number) => Needs, capacity: Capacity, max: number): number {
    const fits = (count: number) =>
      decide(
        needsOf(count),
        { ...capacity, shmEvictableBytes: Math.max(0, capacity.shmEvictableBytes - this.evictionClaims) },
        this.held,
        this.limits,
      ).ok;
    let lo = 0;
    let hi = Math.max(0, Math.floor(max));
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (fits(mid)) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The reservation, or a refusal (never both). */
  admit(needs: Needs, capacity: Capacity): { ok: true; ticket: Ticket; evictBytes: number } | { ok: false; refusal: Refusal } {
    const verdict = decide(
      needs,
      { ...capacity, shmEvictableBytes: Math.max(0, capacity.shmEvictableBytes - this.evictionClaims) },
      this.held,
      this.limits,
    );
    if (!verdict.ok) return verdict;
    this.held = addNeeds(this.held, needs);
    let claim = verdict.evictBytes;
    this.evictionClaims += claim;
    let released = false;
    const dropClaim = () => {
      this.evictionClaims -= claim;
      claim = 0;
    };
    const ticket: Ticket = {
      needs,
      release: () => {
        if (released) return;
        released = true;
        dropClaim();
        this.held = {
          memoryBytes: this.held.memoryBytes - needs.memoryBytes,
          shmBytes: this.held.shmBytes - needs.shmBytes,
          sandboxes: this.held.sandboxes - needs.sandboxes,
          branches: this.held.branches - needs.branches,
          why: "",
        };
      },
      evicted: dropClaim,
    };
    return { ok: true, ticket, evictBytes: verdict.evictBytes };
  }
}

function mib(bytes: number): string {
  return bytes >= 10 * 1024 * MIB ? `${(bytes / (1024 * MIB)).toFixed(1)} GiB` : `${Math.round(bytes / MIB)} MiB`;
}
