// Request and response shapes of REST API v1. The daemon validates with these,
// the OpenAPI document is generated from them, and the SDK's types are inferred
// from them: one source of truth.
import { MAX_EXEC_TIMEOUT_MS, PROCESS_SIGNALS } from "@forkd/agent/protocol";
import { ERROR_STATUS, type ErrorCode } from "@forkd/core/errors";
import { z } from "zod";

/** The range of every timeout a request may carry (routes check them: outside, 400; see request-checks.ts). */
export const TIMEOUT_RANGES = {
  /** exec's timeout_ms (and timeout_secs × 1000): the agent protocol's maximum, so the API and the guest agree. */
  exec: { min: 1, max: MAX_EXEC_TIMEOUT_MS, unit: "ms" },
  /** forkd's timeout_secs on exec. */
  execSecs: { min: 1, max: MAX_EXEC_TIMEOUT_MS / 1000, unit: "s" },
  eval: { min: 1, max: 3_600_000, unit: "ms" },
  /** A sandbox's time to live (timeout_ms on POST /v1/sandboxes). */
  sandbox: { min: 1000, max: 30 * 24 * 3_600_000, unit: "ms" },
  /** forkd's boot_wait_secs on POST /v1/snapshots (accepted, not used). */
  bootWait: { min: 0, max: 60, unit: "s" },
} as const;
export type TimeoutKind = keyof typeof TIMEOUT_RANGES;

/** A timeout field: any number on the wire, so a value out of range is the route's 400, documented here. */
function timeout(kind: TimeoutKind) {
  const r = TIMEOUT_RANGES[kind];
  return z
    .number()
    .optional()
    .describe(`a whole number of ${r.unit === "ms" ? "milliseconds" : "seconds"} from ${r.min} to ${r.max}; beyond: 400`);
}

/** forkd's error body ({"error": message}) with our stable code and a one-line next step beside it. */
export const ErrorBody = z.object({
  error: z.string(),
  /** The closed set of codes (core's ERROR_STATUS), listed as an enum in the OpenAPI document. */
  code: z.enum(Object.keys(ERROR_STATUS) as [ErrorCode, ...ErrorCode[]]),
  remediation: z.string(),
  details: z.record(z.string(), z.unknown()).optional(),
});

export const TagParam = z.object({ tag: z.string() }).strict();
export const IdParam = z.object({ id: z.string() }).strict();

export const CreateSnapshotBody = z
  .object({
    tag: z.string(),
    image: z.string().optional(),
    // forkd boots a kernel and rootfs it is given; forkd here builds parents from images
    // (`image`), so these are accepted for forkd's clients and not used.
    kernel: z.string().optional(),
    rootfs: z.string().optional(),
    rw: z.boolean().optional(),
    tap: z.string().nullable().optional(),
    boot_wait_secs: timeout("bootWait"),
    warm: z.array(z.string()).max(64).optional(),
    warm_eval: z.array(z.string()).max(64).optional(),
    memory_mib: z.number().int().optional(),
    vcpus: z.number().int().optional(),
  })
  .strict();

export const Snapshot = z.object({
  // forkd v0.5.3's SnapshotInfo
  tag: z.string(),
  dir: z.string(),
  created_at_unix: z.number(),
  branched_from: z.string().optional(),
  pause_ms: z.number().optional(),
  warning: z.string().optional(),
  status: z.enum(["ready", "writing", "failed"]),
  // ours (absent while a BRANCH is writing or after it failed)
  image: z.string().optional(),
  image_digest: z.string().optional(),
  created_at: z.string().optional(),
  memory_mib: z.number().optional(),
  vcpus: z.number().optional(),
  memory_bytes: z.number().optional(),
  resident_bytes: z.number().optional(),
  vmstate_bytes: z.number().optional(),
  memory_sha256: z.string().optional(),
  staged: z.boolean().optional(),
  parent: z.string().nullable().optional(),
  /** "diff": only the pages that differ from `parent` are stored. */
  storage: z.enum(["full", "diff"]).optional(),
  /** Bytes this snapshot's own files take in the store (a diff layer: its pages only). */
  physical_bytes: z.number().optional(),
  mode: z.string().optional(),
  error: z.string().nullable().optional(),
  // a BRANCH's own measures
  total_ms: z.number().nullable().optional(),
});
export const SnapshotInfo = z.object({
  tag: z.string(),
  dir: z.string(),
  created_at_unix: z.number(),
  memory_logical_bytes: z.number(),
  memory_physical_bytes: z.number(),
  vmstate_bytes: z.number(),
  parent_tag: z.string().optional(),
  parent_content_hash: z.string().optional(),
  chain_depth: z.number(),
  depth: z.number(),
  ancestors: z.array(z.string()),
  dependents: z.array(z.string()),
  logical_bytes: z.number(),
  physical_bytes: z.number(),
  layers: z.array(
    z.object({ tag: z.string(), kind: z.enum(["full", "diff"]), physical_bytes: z.number(), changed_pages: z.number().nullable() }),
  ),
});
export const CompactBody = z.object({ to: z.string() }).strict();
/**
 * A pack file: over TCP a name inside $FORKD_HOME/packs (relative, or absolute within it);
 * over the unix socket any absolute path. pack-paths.ts applies the rule per transport.
 */
const PackPath = z
  .string()
  .min(1)
  .max(4096)
  .refine((p) => !p.includes("\0"), "must not contain NUL");
export const PackBody = z.object({ path: PackPath }).strict();
export const UnpackBody = z.object({ path: PackPath, tag: z.string().optional() }).strict();
/** A registry reference (HOST/REPO:TAG), a hub name (OWNER/NAME) or a pack URL; checked by core, which names the three forms. */
const PullRef = z.string().min(1).max(4096);
export const PushBody = z.object({ ref: PullRef }).strict();
export const PullBody = z.object({ ref: PullRef, tag: z.string().optional(), hub: z.string().max(4096).optional() }).strict();
export const Job = z.object({
  id: z.string(),
  kind: z.enum(["pack", "unpack", "push", "pull"]),
  status: z.enum(["running", "succeeded", "failed"]),
  progress: z.object({ done_bytes: z.number(), total_bytes: z.number(), step: z.string() }),
  result: z.record(z.string(), z.unknown()).nullable(),
  error: z.object({ code: z.string(), message: z.string() }).nullable(),
  created_at: z.string(),
  finished_at: z.string().nullable(),
});
export const JobIdParam = z.object({ id: z.string().regex(/^job-[0-9a-f]{12}$/, "job ids look like job-0123456789ab") }).strict();
export const SnapshotList = z.array(Snapshot);

export const BranchBody = z
  .object({
    tag: z.string().nullable().optional(),
    mode: z.enum(["full", "diff", "live"]).nullable().optional(),
    /** forkd's older flags for mode diff and mode live. */
    diff: z.boolean().optional(),
    live: z.boolean().optional(),
    /** forkd measured an extra diff for timing; every BRANCH here reports its pause, so it changes nothing. */
    measure_diff: z.boolean().optional(),
    wait: z.boolean().optional(),
    /** forkd's chain edge: must be the source's snapshot (every BRANCH here is a layer on it). */
    parent_tag: z.string().nullable().optional(),
  })
  .strict();
export const SnapshotStatus = z.object({
  tag: z.string(),
  status: z.enum(["writing", "ready", "failed"]),
  error: z.string().nullable(),
  pause_ms: z.number().nullable(),
  total_ms: z.number().nullable(),
  branched_from: z.string().nullable(),
});

export const CreateSandboxesBody = z
  .object({
    snapshot_tag: z.string(),
    n: z.number().int().optional(),
    /** forkd puts each child in its own netns; here every child always has a private network and its own egress rules. */
    per_child_netns: z.boolean().optional(),
    /** forkd options with no meaning here (children are always restored warm, RAM is always shmem-backed). */
    prewarm: z.boolean().optional(),
    live_fork: z.boolean().optional(),
    hugepages: z.boolean().optional(),
    memory_limit_mib: z.number().int().nullable().optional(),
    /** CPUs each sandbox may use (a cgroup quota; fractions allowed, e.g. 0.5); its vCPUs by default. Out of range: 400. */
    cpu_limit: z.number().optional(),
    network: z.boolean().optional(),
    /** Exceptions to the default egress deny: IP, CIDR, IP:PORT, [v6]:PORT or CIDR:PORT (allow_out wins over deny_out). */
    allow_out: z.array(z.string()).optional(),
    /** Destinations the default egress policy allows that these sandboxes may not reach. */
    deny_out: z.array(z.string()).optional(),
    /** Kill each sandbox this long after it starts (E2B's timeoutMs). */
    timeout_ms: timeout("sandbox"),
    metadata: z.record(z.string(), z.string()).optional(),
  })
  .strict();

export const Sandbox = z.object({
  // forkd v0.5.3's SandboxInfo
  id: z.string(),
  snapshot_tag: z.string().nullable(),
  netns: z.string().nullable(),
  guest_addr: z.string(),
  created_at_unix: z.number(),
  pid: z.number(),
  memory_limit_mib: z.number().nullable(),
  has_branched: z.boolean(),
  last_branch_memory_path: z.string().nullable(),
  branch_count: z.number(),
  // ours
  image: z.string(),
  state: z.string(),
  created_at: z.string(),
  memory_mib: z.number(),
  vcpus: z.number(),
  network: z.string(),
  network_policy: z
    .object({ mode: z.enum(["none", "public", "unfiltered"]), allow_out: z.array(z.string()), deny_out: z.array(z.string()) })
    .nullable(),
  expires_at: z.string().nullable(),
  metadata: z.record(z.string(), z.string()),
  /** "unhealthy": its guest broke the agent protocol; agent calls answer 409 until it is killed. */
  health: z.enum(["healthy", "unhealthy"]),
  health_reason: z.string().nullable(),
  /** The snapshot tag whose hot pool holds it, not handed out yet (listed only with ?pool=true); null for users' sandboxes. */
  pool: z.string().nullable(),
  /**
   * On the answer to a fork: how long each step of this child's restore took. A child
   * handed out from the hot pool was restored earlier: its restore steps are 0 and
   * pool_claim_ms is the hand-out (taken from the pool, fresh identity answered).
   */
  timings: z
    .object({
      vmm_start_ms: z.number(),
      restore_ms: z.number(),
      first_answer_ms: z.number(),
      total_ms: z.number(),
      pool_claim_ms: z.number().optional(),
    })
    .optional(),
  /** In a cluster: the node the sandbox runs on. */
  node: z.string().optional(),
});
export const SandboxList = z.array(Sandbox);
/** forkd answers a fork with the children's SandboxInfo, as a bare array. */
export const ForkResult = z.array(Sandbox);
export const ListSandboxesQuery = z.object({ pool: z.enum(["true", "false"]).optional() });

/** A hot pool: children of one snapshot kept restored and answering, handed out by forks first. */
export const PoolBody = z.object({ size: z.number().int() }).strict();
export const Pool = z.object({
  tag: z.string(),
  /** Children wanted. */
  size: z.number(),
  /** Restored and answering, waiting to be handed out. */
  ready: z.number(),
  /** Being restored (at background CPU priority). */
  starting: z.number(),
  updated_at: z.string().nullable(),
});
export const PoolList = z.array(Pool);

/** One call, N children of a running sandbox: a live capture of it (paused only to copy what it wrote), then N restores. */
export const ForkLiveBody = z
  .object({
    n: z.number().int().optional(),
    /** The snapshot the capture is registered as (in the background); default SOURCE_TAG-live-… */
    tag: z.string().optional(),
    /** Kill each child this long after it starts. */
    timeout_ms: z.number().int().optional(),
    metadata: z.record(z.string(), z.string()).optional(),
  })
  .strict();
export const ForkLiveResponse = z.object({
  /** The capture, registered in the background as a snapshot layered on the source's (status "writing" until then). */
  tag: z.string(),
  source_id: z.string(),
  /** How long the source was paused (QEMU's STOP to RESUME). */
  source_pause_ms: z.number(),
  /** From the request until the capture could be forked from. */
  capture_ready_ms: z.number(),
  /** From the request until every child answered. */
  total_ms: z.number(),
  /** Pages the source had written since it was restored: the only memory the capture copied. */
  captured_pages: z.number(),
  sandboxes: z.array(Sandbox),
  /** In a cluster, when the children outnumbered the source's node's room: where they went and what moved. */
  spread: z
    .object({
      /** Children per node (the source's node first: it forks from the capture itself). */
      shares: z.array(z.object({ node: z.string(), n: z.number(), locality: z.string() })),
      refused: z.array(z.object({ node: z.string(), reason: z.string() })),
      /** Per node that fetched the capture: bytes it downloaded, and what the whole chain would have been. */
      pulled: z.array(z.object({ node: z.string(), downloaded_bytes: z.number(), transfer_bytes: z.number() })),
      /** Bytes the source's node uploaded to the registry (the layer only, when the base is there). */
      pushed_bytes: z.number(),
      owner_n: z.number(),
      /** The capture's own files on disk: its written pages, their page map and the device state. */
      layer_bytes: z.number(),
      /** The registry's bytes for the whole chain: what a node with nothing pulls. */
      full_pack_bytes: z.number(),
    })
    .optional(),
});

export const ExecBody = z
  .object({
    /** forkd's argv. */
    args: z.array(z.string()).min(1).optional(),
    argv: z.array(z.string()).min(1).optional(),
    /** A shell command line (run with /bin/sh -c). */
    cmd: z.string().optional(),
    env: z.record(z.string(), z.string()).optional(),
    cwd: z.string().optional(),
    stdin: z.string().optional(),
    stdin_encoding: z.enum(["utf8", "base64"]).optional(),
    /** forkd's timeout, in seconds. */
    timeout_secs: timeout("execSecs"),
    timeout_ms: timeout("exec"),
    /** Start it and answer with its pid at once (E2B's background: true); its stdin stays open. */
    background: z.boolean().optional(),
    /** A label for a background process, shown when processes are listed. */
    tag: z.string().optional(),
  })
  .strict();

export const ExecResponse = z.object({
  // forkd v0.5.3
  stdout: z.string(),
  stderr: z.string(),
  exit_code: z.number().nullable(),
  // ours
  signal: z.string().nullable(),
  timed_out: z.boolean(),
  duration_ms: z.number(),
  /** Output passed the daemon's limit (FORKD_MAX_OUTPUT_BYTES, default 16 MiB): the rest was dropped and the command killed. */
  truncated: z.boolean(),
});

export const EvalBody = z
  .object({ code: z.string(), language: z.enum(["javascript", "python"]).optional(), timeout_ms: timeout("eval") })
  .strict();
export const EvalResponse = z.object({
  // forkd v0.5.3: the value as text (Python: its repr), or the error as text
  result: z.string().nullable(),
  error: z.string().nullable(),
  exit_code: z.number(),
  // ours
  value: z.unknown().optional(),
  type: z.string().optional(),
  language: z.enum(["javascript", "python"]),
  duration_ms: z.number(),
  stdout: z.string().optional(),
  /** The code ran past its timeout_ms (30 s by default) and was interrupted: `error` says so. */
  timed_out: z.boolean().optional(),
});

export const FilesBody = z.discriminatedUnion("action", [
  z.object({ action: z.literal("read"), path: z.string() }).strict(),
  z
    .object({
      action: z.literal("write"),
      path: z.string(),
      data: z.string(),
      encoding: z.enum(["utf8", "base64"]).optional(),
      mode: z.number().int().optional(),
    })
    .strict(),
  z.object({ action: z.literal("list"), path: z.string() }).strict(),
  z.object({ action: z.literal("stat"), path: z.string() }).strict(),
  z.object({ action: z.literal("mkdir"), path: z.string() }).strict(),
  z.object({ action: z.literal("remove"), path: z.string(), recursive: z.boolean().optional() }).strict(),
]);

export const PingResponse = z.object({
  pong: z.literal(true),
  agent_lang: z.string(),
  warmup_ready: z.boolean(),
  version: z.string(),
  uptime_ms: z.number(),
  hostname: z.string(),
  rtt_ms: z.number(),
});
export const Workspace = z.object({
  id: z.string(),
  name: z.string(),
  source_snapshot_tag: z.string(),
  current_state_tag: z.string().optional(),
  status: z.enum(["running", "suspended", "stale"]),
  live_sandbox_id: z.string().optional(),
  created_at_unix: z.number(),
  last_active_unix: z.number(),
  memory_limit_mib: z.number().nullable(),
});
export const WorkspaceList = z.array(Workspace);
export const CreateWorkspaceBody = z
  .object({
    name: z.string(),
    snapshot_tag: z.string(),
    /** forkd's option; every sandbox here has a private network anyway. */
    per_child_netns: z.boolean().optional(),
    memory_limit_mib: z.number().int().nullable().optional(),
  })
  .strict();
export const SuspendWorkspaceBody = z.object({ diff: z.boolean().optional() }).strict();
export const NameParam = z.object({ name: z.string() }).strict();
export const Health = z.object({ ok: z.literal(true) });
export const Version = z.object({ version: z.string(), api: z.literal("v1"), node: z.string(), accel: z.string() });
/** What E2B's SDKs need to reach this daemon (`forkd e2b env`): the key is the daemon's credential, so only its holders see it. */
export const E2bEnv = z.object({ api_url: z.string().nullable(), api_key: z.string() });
export type E2bEnvT = z.infer<typeof E2bEnv>;

export type CreateSnapshotBodyT = z.infer<typeof CreateSnapshotBody>;
export type SnapshotT = z.infer<typeof Snapshot>;
export type SnapshotInfoT = z.infer<typeof SnapshotInfo>;
export type JobT = z.infer<typeof Job>;
export type WorkspaceT = z.infer<typeof Workspace>;
export type CreateWorkspaceBodyT = z.infer<typeof CreateWorkspaceBody>;
export type PackBodyT = z.infer<typeof PackBody>;
export type UnpackBodyT = z.infer<typeof UnpackBody>;
export type PushBodyT = z.infer<typeof PushBody>;
export type PullBodyT = z.infer<typeof PullBody>;
export type CreateSandboxesBodyT = z.infer<typeof CreateSandboxesBody>;
export type SandboxT = z.infer<typeof Sandbox>;
export type ForkResultT = z.infer<typeof ForkResult>;
export type PoolT = z.infer<typeof Pool>;
export type ClusterNodeT = z.infer<typeof ClusterNodeView>;
export type DrainResultT = z.infer<typeof DrainResult>;
export type ForkLiveBodyT = z.infer<typeof ForkLiveBody>;
export type ForkLiveResponseT = z.infer<typeof ForkLiveResponse>;
export type ExecBodyT = z.infer<typeof ExecBody>;
export type ExecResponseT = z.infer<typeof ExecResponse>;
export type EvalBodyT = z.infer<typeof EvalBody>;
export type EvalResponseT = z.infer<typeof EvalResponse>;
export type FilesBodyT = z.infer<typeof FilesBody>;
export type PingResponseT = z.infer<typeof PingResponse>;
export type VersionT = z.infer<typeof Version>;
export type BranchBodyT = z.infer<typeof BranchBody>;
/** forkd answers a BRANCH with the new snapshot's SnapshotInfo; ours adds how it went. */
export type BranchResponseT = SnapshotT;
export type SnapshotStatusT = z.infer<typeof SnapshotStatus>;

// Background processes (E2B's commands.run with background, list, kill, connect, sendStdin).
export const ProcessParam = z
  .object({ id: z.string(), pid: z.string().regex(/^[1-9][0-9]{0,6}$/, "a pid is a positive integer") })
  .strict();
export const ProcessInfo = z.object({
  pid: z.number(),
  tag: z.string().nullable(),
  /** E2B's shape: the program and its arguments (a shell command line is /bin/sh, -c and the line). */
  cmd: z.string(),
  args: z.array(z.string()),
  envs: z.record(z.string(), z.string()),
  cwd: z.string(),
  running: z.boolean(),
  exit_code: z.number().nullable(),
  signal: z.string().nullable(),
  timed_out: z.boolean(),
  started_at: z.string(),
  ended_at: z.string().nullable(),
  /** Output it has written in all (the last 1 MiB of each stream is kept for reattaching). */
  stdout_bytes: z.number(),
  stderr_bytes: z.number(),
  stdin_open: z.boolean(),
});
export const ProcessList = z.array(ProcessInfo);
export const KillProcessQuery = z.object({ signal: z.enum(PROCESS_SIGNALS).optional() }).strict();
export const ProcessStdinBody = z
  .object({ data: z.string().optional(), encoding: z.enum(["utf8", "base64"]).optional(), eof: z.boolean().optional() })
  .strict();
export const ProcessStdinResponse = z.object({ pid: z.number(), bytes: z.number(), stdin_open: z.boolean() });
export type ProcessInfoT = z.infer<typeof ProcessInfo>;
export type ProcessStdinBodyT = z.infer<typeof ProcessStdinBody>;
export type ProcessStdinResponseT = z.infer<typeof ProcessStdinResponse>;
export type ProcessSignalT = (typeof PROCESS_SIGNALS)[number];

/** A node of the cluster as `GET /v1/cluster/nodes` lists it (its record in etcd, with the drain flag). */
const ClusterNodeView = z.object({
  name: z.string(),
  url: z.string(),
  version: z.string(),
  joined_at: z.string(),
  updated_at: z.string(),
  draining: z.boolean(),
  /** The node that answered this call. */
  self: z.boolean(),
  load: z.number(),
  capacity: z.object({
    max_sandboxes: z.number(),
    sandboxes: z.number(),
    max_branches: z.number(),
    branches: z.number(),
    memory_free_bytes: z.number(),
    shm_free_bytes: z.number(),
  }),
  snapshots: z.array(z.object({ tag: z.string(), presence: z.enum(["pool_ready", "staged", "on_disk"]) })),
});
export const ClusterNodeList = z.array(ClusterNodeView);
export const DrainResult = z.object({ name: z.string(), draining: z.boolean() });

/** GET /v1/metrics/summary: what the dashboard charts, as JSON (Prometheus text stays at /metrics). */
export const MetricsSummary = z.object({
  ts: z.string(),
  sandboxes_active: z.number(),
  /** Children restored in the last minute. */
  forks_per_min: z.number(),
  /** Over the last 512 restores (null before any). */
  spawn_p50_ms: z.number().nullable(),
  spawn_p99_ms: z.number().nullable(),
  spawns_seen: z.number(),
  /** Pooled children handed out (taken from the pool, fresh identity answered), over the last 512 (null before any). */
  pool_claim_p50_ms: z.number().nullable(),
  pool_claim_p99_ms: z.number().nullable(),
  pool_claims_seen: z.number(),
  host: z.object({
    mem_total_bytes: z.number(),
    mem_available_bytes: z.number(),
    shm_total_bytes: z.number(),
    shm_free_bytes: z.number(),
    /** Held on the staging filesystem by work admitted and in flight. */
    shm_reserved_bytes: z.number(),
  }),
  /** Each live sandbox's memory and CPU time from its cgroup (null where the host has none). */
  sandboxes: z.record(z.string(), z.object({ memory_bytes: z.number().nullable(), cpu_usec: z.number().nullable() })),
});
export type MetricsSummaryT = z.infer<typeof MetricsSummary>;
