// The public shapes of snapshots and sandboxes (snake_case, as the REST API and
// every --json output show them): one mapping, used by the daemon and the CLI.
import type { ApiNetworkPolicy } from "../net/policy.js";
import type { SandboxInfo } from "../sandbox/lifecycle.js";
import { physicalBytes } from "../store/chains.js";
import type { SnapshotInfo } from "../store/snapshots.js";

export type ApiSnapshot = {
  tag: string;
  image: string;
  image_digest: string;
  created_at: string;
  memory_mib: number;
  vcpus: number;
  memory_bytes: number;
  resident_bytes: number;
  vmstate_bytes: number;
  memory_sha256: string;
  staged: boolean;
  parent: string | null;
  branched_from: string | null;
  storage: "full" | "diff";
  physical_bytes: number;
  status: "ready";
};

export type ApiSandbox = {
  id: string;
  snapshot_tag: string | null;
  image: string;
  state: string;
  pid: number;
  created_at: string;
  memory_mib: number;
  vcpus: number;
  network: string;
  /** What the NIC may reach: none, public (the default policy with this sandbox's lists) or unfiltered (policy off). */
  network_policy: ApiNetworkPolicy | null;
  memory_limit_mib: number | null;
  expires_at: string | null;
  metadata: Record<string, string>;
  /** "unhealthy" once its guest broke the agent protocol; its agent calls are refused from then on. */
  health: "healthy" | "unhealthy";
  health_reason: string | null;
};

export function apiSnapshotView(s: SnapshotInfo): ApiSnapshot {
  return {
    tag: s.tag,
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
    branched_from: s.branchedFrom,
    storage: s.layer ? "diff" : "full",
    physical_bytes: physicalBytes(s),
    status: "ready",
  };
}

export function apiSandboxView(s: SandboxInfo): ApiSandbox {
  return {
    id: s.id,
    snapshot_tag: s.tag,
    image: s.image,
    state: s.alive ? s.state : "dead",
    pid: s.pid,
    created_at: s.created_at,
    memory_mib: s.memory_mib,
    vcpus: s.vcpus,
    network: s.network,
    network_policy: s.network_policy ? (JSON.parse(s.network_policy) as ApiNetworkPolicy) : null,
    memory_limit_mib: s.memory_limit_mib,
    expires_at: s.expires_at_ms ? new Date(s.expires_at_ms).toISOString() : null,
    metadata: s.metadata ? (JSON.parse(s.metadata) as Record<string, string>) : {},
    health: s.health === "unhealthy" ? "unhealthy" : "healthy",
    health_reason: s.health_reason ?? null,
  };
}
