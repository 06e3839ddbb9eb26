// What the CLI's two backends (daemon and direct) have in common: the Backend
// interface and the rows it returns. Types only, so either backend loads alone.
import type { ApiSandbox, ApiSnapshot, ApiWorkspace, SnapshotDetails } from "@forkd/core";

export type ForkRow = {
  id: string;
  ok: boolean;
  vmm_start_ms?: number;
  restore_ms?: number;
  first_answer_ms?: number;
  total_ms?: number;
  error?: { code: string; message: string; console?: string };
};
export type { ApiWorkspace };
export type ExecArgs = { argv?: string[]; cmd?: string; env?: Record<string, string>; cwd?: string; timeoutMs?: number; stdin?: Buffer };
type ExecOutcome = { exitCode: number | null; signal: string | null; timedOut: boolean };
export type FilesArgs = { action: "read" | "write" | "list"; path: string; data?: Buffer };
export type SnapshotArgs = {
  tag: string;
  image: string;
  warm: string[];
  warmEval: string[];
  memoryMib: number;
  vcpus: number;
  onProgress?: (step: string) => void;
};

/** A live fork-to-many: the capture of the running source, and its children. */
export type LiveForkRows = {
  tag: string;
  source_pause_ms: number;
  capture_ready_ms: number;
  total_ms: number;
  captured_pages: number;
  children: ForkRow[];
};

type PoolRow = { tag: string; size: number; ready: number; starting: number };

/** What a BRANCH reports, the same through the daemon and directly. */
export type BranchRow = {
  tag: string;
  mode?: string;
  status: string;
  pause_ms?: number;
  total_ms?: number | null;
  branched_from?: string;
};

export interface Backend {
  branch(id: string, args: { tag?: string; mode?: string; wait: boolean }): Promise<BranchRow>;
  readonly kind: "daemon" | "direct";
  createSnapshot(args: SnapshotArgs): Promise<ApiSnapshot>;
  listSnapshots(): Promise<ApiSnapshot[]>;
  removeSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean }): Promise<void>;
  snapshotInfo(tag: string): Promise<SnapshotDetails>;
  compactSnapshot(tag: string, to: string): Promise<ApiSnapshot>;
  fork(args: {
    tag: string;
    n: number;
    memoryLimitMib?: number;
    cpuLimit?: number;
    network: boolean;
    allowOut?: string[];
    denyOut?: string[];
    /** Restores in flight; from the host's cores when absent. */
    concurrency?: number;
    onChild?: () => void;
  }): Promise<ForkRow[]>;
  /** Users' sandboxes; with `pool`, the children waiting in hot pools too. */
  listSandboxes(opts?: { pool?: boolean }): Promise<ApiSandbox[]>;
  listPools(): Promise<PoolRow[]>;
  /** N children of the running sandbox `id` (live fork-to-many). */
  forkLive(id: string, args: { n: number; tag?: string; concurrency?: number }): Promise<LiveForkRows>;
  exec(id: string, args: ExecArgs, onStdout: (d: Buffer) => void, onStderr: (d: Buffer) => void): Promise<ExecOutcome>;
  eval(
    id: string,
    code: string,
    language?: "javascript" | "python",
  ): Promise<{ value: unknown; type: string; duration_ms: number; stdout?: string }>;
  files(id: string, args: FilesArgs): Promise<Record<string, unknown>>;
  kill(id: string): Promise<void>;
  ping(id: string): Promise<Record<string, unknown>>;
  workspaces: {
    list(): Promise<ApiWorkspace[]>;
    create(name: string, snapshotTag: string, memoryLimitMib?: number): Promise<ApiWorkspace>;
    suspend(name: string, diff: boolean): Promise<ApiWorkspace>;
    resume(name: string): Promise<ApiWorkspace>;
    remove(name: string): Promise<void>;
  };
}
