// The public shapes of snapshots and sandboxes, as the REST API and every --json
// output show them: forkd v0.5.3's fields (so forkd's own clients read them),
// then ours beside them. One mapping, used by the daemon and the CLI.
import path from "node:path";
import type { ApiNetworkPolicy } from "../net/policy.js";
import type { StartedChild } from "../sandbox/fork-policy.js";
import { getSandbox, type SandboxInfo } from "../sandbox/lifecycle.js";
import { physicalBytes } from "../store/chains.js";
import { type SnapshotInfo, tagDir } from "../store/snapshots.js";
import { type BranchRow, branches } from "../store/state.js";

type SnapshotStatusName = "ready" | "writing" | "failed";

export type ApiSnapshot = {
  // forkd v0.5.3
  tag: string;
  dir: string;
  created_at_unix: number;
  branched_from?: string;
  pause_ms?: number;
  warning?: string;
  status: SnapshotStatusName;
  // ours (absent on a BRANCH still writing or failed)
  image?: string;
  image_digest?: string;
  created_at?: string;
  memory_mib?: number;
  vcpus?: number;
  memory_bytes?: number;
  resident_bytes?: number;
  vmstate_bytes?: number;
  memory_sha256?: string;
  staged?: boolean;
  parent?: string | null;
  storage?: "full" | "diff";
  physical_bytes?: number;
  mode?: string;
  error?: string | null;
};

export type ApiSandbox = {
  // forkd v0.5.3
  id: string;
  snapshot_tag: string | null;
  netns: string | null;
  guest_addr: string;
  created_at_unix: number;
  pid: number;
  memory_limit_mib: number | null;
  has_branched: boolean;
  last_branch_memory_path: string | null;
  branch_count: number;
  // ours
  image: string;
  state: string;
  created_at: string;
  memory_mib: number;
  vcpus: number;
  network: string;
  /** What the NIC may reach: none, public (the default policy with this sandbox's lists) or unfiltered (policy off). */
  network_policy: ApiNetworkPolicy | null;
  expires_at: string | null;
  metadata: Record<string, string>;
  /** "unhealthy" once its guest broke the agent protocol; its agent calls are refused from then on. */
  health: "healthy" | "unhealthy";
  health_reason: string | null;
  /** The snapshot tag whose hot pool holds it, unclaimed; null for every sandbox a user holds. */
  pool: string | null;
};

/** Where a sandbox's agent is: forkd reports a guest TCP address; ours is a virtio-serial port. */
const GUEST_ADDR = "virtio-serial:forkd.agent";

function unixSeconds(iso: string): number {
  return Math.floor(Date.parse(iso) / 1000);
}

export function apiSnapshotView(s: SnapshotInfo): ApiSnapshot {
  return {
    tag: s.tag,
    dir: s.dir,
    created_at_unix: unixSeconds(s.createdAt),
    ...(s.branchedFrom ? { branched_from: s.branchedFrom } : {}),
    ...(s.branch ? { pause_ms: Math.round(s.branch.pauseMs) } : {}),
    status: "ready",
    image: s.image.name,
    image_digest: s.image.digest,
    created_at: s.createdAt,
    memory_mib: s.memoryMib,
    vcpus: s.vcpus,
    memory_bytes: s.sizes.memoryBytes,
    resident_bytes: s.sizes.memoryAllocatedBytes,
    vmstate_bytes: s.sizes.vmstateBytes,
    memory_sha256: s.memorySha256,
    staged: s.staged,
    parent: s.parent,
    storage: s.layer ? "diff" : "full",
    physical_bytes: physicalBytes(s),
    ...(s.branch ? { mode: s.branch.mode } : {}),
  };
}

/** A BRANCH still being written, or one that failed: listed as forkd lists them, with what is known. */
export function apiPendingSnapshotView(b: BranchRow): ApiSnapshot {
  return {
    tag: b.tag,
    dir: tagDir(b.tag),
    created_at_unix: unixSeconds(b.created_at),
    branched_from: b.source_id,
    ...(b.pause_ms !== null ? { pause_ms: Math.round(b.pause_ms) } : {}),
    ...(b.status === "failed" && b.error ? { warning: b.error } : {}),
    status: b.status,
    created_at: b.created_at,
    mode: b.mode,
    error: b.error,
  };
}

/** BRANCHes that finished, per source sandbox: forkd's has_branched, branch_count, last_branch_memory_path. */
export function branchesBySource(rows: BranchRow[] = branches.list()): Map<string, BranchRow[]> {
  const out = new Map<string, BranchRow[]>();
  for (const row of rows) {
    if (row.status !== "ready") continue;
    out.set(row.source_id, [...(out.get(row.source_id) ?? []), row]);
  }
  return out;
}

export function apiSandboxView(s: SandboxInfo, bySource: Map<string, BranchRow[]> = branchesBySource()): ApiSandbox {
  const done = bySource.get(s.id) ?? [];
  const last = done.at(-1);
  return {
    id: s.id,
    snapshot_tag: s.tag,
    netns: null,
    guest_addr: GUEST_ADDR,
    created_at_unix: unixSeconds(s.created_at),
    pid: s.pid,
    memory_limit_mib: s.memory_limit_mib,
    has_branched: done.length > 0,
    last_branch_memory_path: last ? path.join(tagDir(last.tag), "memory.bin") : null,
    branch_count: done.length,
    image: s.image,
    state: s.alive ? s.state : "dead",
    created_at: s.created_at,
    memory_mib: s.memory_mib,
    vcpus: s.vcpus,
    network: s.network,
    network_policy: s.network_policy ? (JSON.parse(s.network_policy) as ApiNetworkPolicy) : null,
    expires_at: s.expires_at_ms ? new Date(s.expires_at_ms).toISOString() : null,
    metadata: s.metadata ? (JSON.parse(s.metadata) as Record<string, string>) : {},
    health: s.health === "unhealthy" ? "unhealthy" : "healthy",
    health_reason: s.health_reason ?? null,
    pool: s.pool ?? null,
  };
}

/** How long each step of a child's start took, as the API and every --json output show it. */
export type ApiChildTimings = {
  vmm_start_ms: number;
  restore_ms: number;
  first_answer_ms: number;
  total_ms: number;
  /** A child handed out of a hot pool: the time of its claim (its identity call), which is all its start cost. */
  pool_claim_ms?: number;
};

/** A child a fork just started: the sandbox, and how long its start took. */
export type ApiStartedChild = ApiSandbox & { timings: ApiChildTimings };

export function childTimingsView(c: StartedChild): ApiChildTimings {
  return {
    vmm_start_ms: c.timings.vmmStartMs,
    restore_ms: c.timings.restoreMs,
    first_answer_ms: c.timings.firstAnswerMs,
    total_ms: c.timings.totalMs,
  };
}

/** A child just restored (a fork from a snapshot, a live fork), as the API shows it. */
export function restoredChildView(c: StartedChild, bySource: Map<string, BranchRow[]> = branchesBySource()): ApiStartedChild {
  return { ...apiSandboxView(getSandbox(c.id), bySource), timings: childTimingsView(c) };
}

/** A child just claimed from a hot pool, as the API shows it: no restore, only the claim. */
export function claimedChildView(
  c: { id: string; claimMs: number },
  bySource: Map<string, BranchRow[]> = branchesBySource(),
): ApiStartedChild {
  return {
    ...apiSandboxView(getSandbox(c.id), bySource),
    timings: { vmm_start_ms: 0, restore_ms: 0, first_answer_ms: c.claimMs, total_ms: c.claimMs, pool_claim_ms: c.claimMs },
  };
}
