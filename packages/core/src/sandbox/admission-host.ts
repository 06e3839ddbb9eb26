// Admission control, the I/O: read the host (MemAvailable, free space on the
// staging filesystem, idle staged images), size the work from its snapshot, and
// reserve on the daemon's ledger. The figures and the verdict are admission.ts.
import fs from "node:fs";
import path from "node:path";
import { shmDir } from "../common/config.js";
import { setting } from "../common/settings.js";
import { hasSealedCopy } from "../store/sealed-images.js";
import { getSnapshot, type SnapshotInfo } from "../store/snapshots.js";
import { evictableStagedBytes, evictStaged, stagedPath } from "../store/staging.js";
import {
  type AdmissionLedger,
  branchNeeds,
  type Capacity,
  defaultLimits,
  forkNeeds,
  type Limits,
  liveForkNeeds,
  type Needs,
  parseMemInfo,
  refusalError,
  snapshotNeeds,
  type Ticket,
} from "./admission.js";
import { listSandboxes } from "./lifecycle.js";
import { forkableSnapshot } from "./offered-captures.js";

const MIB = 2 ** 20;

/** Free bytes of the filesystem holding `dir` (its nearest existing ancestor: the staging dir may not exist yet). */
function freeBytesOn(dir: string): number {
  let at = path.resolve(dir);
  while (!fs.existsSync(at) && path.dirname(at) !== at) at = path.dirname(at);
  const st = fs.statfsSync(at);
  return st.bavail * st.bsize;
}

export function readCapacity(): Capacity {
  const mem = parseMemInfo(fs.readFileSync("/proc/meminfo", "utf8"));
  return {
    ...mem,
    shmFreeBytes: freeBytesOn(shmDir()),
    shmEvictableBytes: evictableStagedBytes(),
    sandboxesAlive: listSandboxes().filter((s) => s.alive).length,
  };
}

/**
 * The daemon's limits. FORKD_ADMIT_MEMORY_HEADROOM_MIB sets the host memory
 * admission never hands out; FORKD_ADMIT_DIRTY_FRACTION (0..1) how much of its RAM
 * a child without a memory limit is counted as writing (1: the worst case).
 */
export function admissionLimits(opts: { maxSandboxes: number; maxBranches: number }): Limits {
  const headroomMib = setting("admitMemoryHeadroomMib");
  const dirtyFraction = setting("admitDirtyFraction");
  return defaultLimits({
    ...opts,
    memTotalBytes: parseMemInfo(fs.readFileSync("/proc/meminfo", "utf8")).memTotalBytes,
    ...(headroomMib !== undefined ? { memoryHeadroomBytes: headroomMib * MIB } : {}),
    dirtyFraction,
  });
}

/** Bytes staging this snapshot writes to shmem: its memory image unless staged, and unstaged ancestors a layer is assembled from. */
export async function unstagedChainBytes(snapshot: SnapshotInfo): Promise<number> {
  let total = 0;
  let current: SnapshotInfo | undefined = snapshot;
  for (let depth = 0; current && depth <= 64; depth++) {
    if (current.staged) break;
    total += current.sizes.memoryBytes;
    current = current.layer && current.parent ? await getSnapshot(current.parent).catch(() => undefined) : undefined;
  }
  return total;
}

/** The image's size when children of it would need a sealed copy made first (none held yet), else 0. */
export function unsealedBytes(snapshot: SnapshotInfo): number {
  return hasSealedCopy(stagedPath(snapshot)) ? 0 : snapshot.sizes.memoryBytes;
}

/**
 * Reserve `needs` or throw the 503 naming what is short. The check and the
 * reservation are one synchronous step; idle staged images the verdict counted on
 * are evicted after it, under the reservation.
 */
async function admit(ledger: AdmissionLedger, needs: Needs): Promise<Ticket> {
  const verdict = ledger.admit(needs, readCapacity());
  if (!verdict.ok) throw refusalError(verdict.refusal);
  if (verdict.evictBytes > 0) {
    try {
      await evictStaged(verdict.evictBytes);
    } catch (err) {
      verdict.ticket.release();
      throw err;
    } finally {
      verdict.ticket.evicted();
    }
  }
  return verdict.ticket;
}

export async function admitFork(
  ledger: AdmissionLedger,
  opts: { tag: string; n: number; memoryLimitMib?: number | undefined },
): Promise<Ticket> {
  const snapshot = await forkableSnapshot(opts.tag);
  return admit(
    ledger,
    forkNeeds({
      n: opts.n,
      guestMemoryBytes: snapshot.memoryMib * MIB,
      memoryLimitMib: opts.memoryLimitMib,
      unstagedBytes: await unstagedChainBytes(snapshot),
      unsealedBytes: unsealedBytes(snapshot),
      dirtyFraction: ledger.limits.dirtyFraction,
    }),
  );
}

/**
 * How many children of `tag` a fork here would be admitted for now, beside the work
 * in flight: what a cluster asks each node before placing a share there. A snapshot
 * this host lacks is sized from `absent` (its RAM, all of it to stage).
 */
export async function forkRoom(
  ledger: AdmissionLedger,
  opts: { tag: string; memoryLimitMib?: number | undefined; absent?: { memoryMib: number } },
): Promise<number> {
  const snapshot = await getSnapshot(opts.tag).catch(() => undefined);
  const memoryMib = snapshot?.memoryMib ?? opts.absent?.memoryMib;
  if (memoryMib === undefined) return 0;
  const unstagedBytes = snapshot ? await unstagedChainBytes(snapshot) : memoryMib * MIB;
  const capacity = readCapacity();
  return ledger.room(
    (n) =>
      forkNeeds({
        n,
        guestMemoryBytes: memoryMib * MIB,
        memoryLimitMib: opts.memoryLimitMib,
        unstagedBytes,
        dirtyFraction: ledger.limits.dirtyFraction,
      }),
    capacity,
    ledger.limits.maxSandboxes - capacity.sandboxesAlive,
  );
}

/** A live fork-to-many of a running sandbox whose guest has `guestMemoryMib` of RAM. */
export function admitLiveFork(ledger: AdmissionLedger, opts: { n: number; guestMemoryMib: number }): Promise<Ticket> {
  return admit(
    ledger,
    liveForkNeeds({ n: opts.n, guestMemoryBytes: opts.guestMemoryMib * MIB, dirtyFraction: ledger.limits.dirtyFraction }),
  );
}

export function admitSnapshot(ledger: AdmissionLedger, memoryMib: number): Promise<Ticket> {
  return admit(ledger, snapshotNeeds(memoryMib));
}

export function admitBranch(ledger: AdmissionLedger, guestMemoryMib: number): Promise<Ticket> {
  return admit(ledger, branchNeeds(guestMemoryMib * MIB));
}
