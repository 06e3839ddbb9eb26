// A typed client for every route of the forkd REST API v1, the one client of
// the daemon: the CLI, the E2B-shaped Sandbox and the MCP server all use it.
// Types come from the daemon's zod schemas (type-only import: no server code is loaded).
import type * as S from "@forkd/daemon/schemas";
import { Agent } from "undici";
import { errorFromBody, ForkdApiError } from "./api-error.js";
import { processEnvironment } from "./environment.js";
import { type DaemonTarget, resolveTarget, targetOf } from "./target.js";

export type ControllerOpts = {
  /** http(s)://host:port of the daemon's TCP listener, or unix:/path/to.sock. */
  url?: string;
  /** Path of the daemon's unix socket (used when no url is given). */
  socketPath?: string;
  token?: string;
  /** Per-request timeout; long operations (snapshot, fork) get their own below. */
  requestTimeoutMs?: number;
};

/**
 * Per call: `signal` cancels it (a ForkdApiError with code `cancelled`), `timeoutMs`
 * replaces the call's own deadline (code `timeout` when it passes).
 */
export type CallOpts = { signal?: AbortSignal; timeoutMs?: number };

export type ExecStreamOpts = { onStdout?: (data: Buffer) => void; onStderr?: (data: Buffer) => void; signal?: AbortSignal };
export type ExecExit = {
  exit_code: number | null;
  signal: string | null;
  timed_out: boolean;
  duration_ms: number;
  /** The daemon dropped output this client read too slowly to take (a `truncated` line marks each gap). */
  truncated?: boolean;
};

type RequestOpts = CallOpts & {
  /** Answer the Response itself (a stream): no deadline but the caller's signal. */
  raw?: boolean;
};

export class Controller {
  /** Where the daemon is and what to call it in messages. */
  readonly target: DaemonTarget;
  /** Deadline of a call that sets none of its own. */
  readonly requestTimeoutMs: number;
  private readonly dispatcher: Agent | undefined;

  constructor(opts: ControllerOpts = {}) {
    this.target = targetOf(opts);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 120_000;
    this.dispatcher = this.target.socketPath ? new Agent({ connect: { socketPath: this.target.socketPath } }) : undefined;
  }

  /**
   * As forkd's clients: FORKD_URL (http(s)://HOST:PORT, or unix:/path/to.sock) and
   * FORKD_TOKEN; without a URL, the local unix socket, which needs no token
   * (`resolveTarget` has the whole rule).
   */
  static fromEnv(env: NodeJS.ProcessEnv = processEnvironment(), opts: Pick<ControllerOpts, "requestTimeoutMs"> = {}): Controller {
    const target = resolveTarget(env);
    return new Controller({
      url: target.socketPath ? `unix:${target.socketPath}` : target.base,
      ...(target.token ? { token: target.token } : {}),
      ...opts,
    });
  }

  private async request<T>(method: string, route: string, body?: unknown, opts: RequestOpts = {}): Promise<T> {
    const headers: Record<string, string> = {};
    if (this.target.token) headers.authorization = `Bearer ${this.target.token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const timeoutMs = opts.timeoutMs ?? this.requestTimeoutMs;
    const deadline = opts.raw ? undefined : AbortSignal.timeout(timeoutMs);
    const signal = deadline && opts.signal ? AbortSignal.any([opts.signal, deadline]) : (deadline ?? opts.signal);
    let res: Response;
    try {
      res = await fetch(`${this.target.base}${route}`, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        ...(signal ? { signal } : {}),
        // undici's dispatcher option is accepted by Node's fetch.
        ...(this.dispatcher ? { dispatcher: this.dispatcher } : {}),
      } as RequestInit);
    } catch (err) {
      throw this.transportError(err, `${method} ${route}`, deadline?.aborted ? timeoutMs : undefined, opts.signal?.aborted);
    }
    if (opts.raw) {
      if (!res.ok) await this.throwFrom(res);
      return res as unknown as T;
    }
    if (res.status === 204) return undefined as T;
    if (!res.ok) await this.throwFrom(res);
    const type = res.headers.get("content-type") ?? "";
    return (type.includes("json") ? await res.json() : await res.text()) as T;
  }

  private async throwFrom(res: Response): Promise<never> {
    const text = await res.text().catch(() => "");
    let json: unknown;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      // not JSON: errorFromBody shows the text
    }
    throw errorFromBody(res.status, json, text);
  }

  /** A call that got no answer, said so with where the daemon was looked for. */
  private transportError(err: unknown, call: string, timedOutAfterMs?: number, cancelled?: boolean): ForkdApiError {
    if (cancelled) return new ForkdApiError(0, "cancelled", `${call} was cancelled by the caller`);
    if (timedOutAfterMs !== undefined) {
      return new ForkdApiError(
        0,
        "timeout",
        `the forkd daemon at ${this.target.label} did not answer ${call} within ${Math.round(timedOutAfterMs / 1000)} s`,
        undefined,
        "the operation may still finish in the daemon: list the sandboxes or snapshots to see; give slow calls a longer timeout",
      );
    }
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const why = cause?.code ?? cause?.message ?? (err as Error).message;
    return new ForkdApiError(
      0,
      "daemon_unreachable",
      `cannot reach the forkd daemon at ${this.target.label}: ${why}`,
      undefined,
      "start it with `forkd daemon`, or point FORKD_URL (and FORKD_TOKEN) at a running one",
    );
  }

  health(): Promise<{ ok: true }> {
    return this.request("GET", "/healthz");
  }
  version(): Promise<S.VersionT> {
    return this.request("GET", "/version");
  }
  /** The URL and key E2B's SDKs use against this daemon (E2B_API_URL/E2B_SANDBOX_URL, E2B_API_KEY). */
  e2bEnv(): Promise<S.E2bEnvT> {
    return this.request("GET", "/v1/e2b/env");
  }
  metrics(): Promise<string> {
    return this.request("GET", "/metrics");
  }
  openapi(): Promise<Record<string, unknown>> {
    return this.request("GET", "/v1/openapi.json");
  }

  listSnapshots(opts: CallOpts = {}): Promise<S.SnapshotT[]> {
    return this.request("GET", "/v1/snapshots", undefined, opts);
  }
  createSnapshot(body: S.CreateSnapshotBodyT, opts: CallOpts = {}): Promise<S.SnapshotT> {
    return this.request("POST", "/v1/snapshots", body, { timeoutMs: 15 * 60_000, ...opts });
  }
  getSnapshot(tag: string): Promise<S.SnapshotT> {
    return this.request("GET", `/v1/snapshots/${encodeURIComponent(tag)}`);
  }
  /** force: kill its live children; cascade: also remove the snapshots stored as layers on it. */
  deleteSnapshot(tag: string, opts: { force?: boolean; cascade?: boolean } = {}): Promise<void> {
    const query = new URLSearchParams({
      ...(opts.force ? { force: "true" } : {}),
      ...(opts.cascade ? { cascade: "true" } : {}),
    }).toString();
    return this.request("DELETE", `/v1/snapshots/${encodeURIComponent(tag)}${query ? `?${query}` : ""}`);
  }

  /** Depth, ancestors, dependents and layer sizes of a snapshot's chain. */
  snapshotInfo(tag: string): Promise<S.SnapshotInfoT> {
    return this.request("GET", `/v1/snapshots/${encodeURIComponent(tag)}/info`);
  }

  /** Pack a snapshot and everything it needs into one file on the daemon's host (a job). */
  packSnapshot(tag: string, body: S.PackBodyT): Promise<S.JobT> {
    return this.request("POST", `/v1/snapshots/${encodeURIComponent(tag)}/pack`, body);
  }

  /** Verify and register a pack file on the daemon's host (a job). */
  unpackSnapshot(body: S.UnpackBodyT): Promise<S.JobT> {
    return this.request("POST", "/v1/snapshots/unpack", body);
  }

  /** Push a snapshot chain to an OCI registry, HOST/REPO:TAG (a job; blobs the registry has are not sent again). */
  pushSnapshot(tag: string, body: S.PushBodyT): Promise<S.JobT> {
    return this.request("POST", `/v1/snapshots/${encodeURIComponent(tag)}/push`, body);
  }

  /** Pull a snapshot chain from a registry reference, a hub name (OWNER/NAME, with `hub`) or a pack URL (a job). */
  pullSnapshot(body: S.PullBodyT): Promise<S.JobT> {
    return this.request("POST", "/v1/snapshots/pull", body);
  }

  getJob(id: string): Promise<S.JobT> {
    return this.request("GET", `/v1/jobs/${encodeURIComponent(id)}`);
  }

  /** Poll a job until it ends; `onProgress` sees each state. A failed job throws with its code. */
  async waitForJob(id: string, opts: { intervalMs?: number; onProgress?: (job: S.JobT) => void } = {}): Promise<S.JobT> {
    for (;;) {
      const job = await this.getJob(id);
      opts.onProgress?.(job);
      if (job.status === "succeeded") return job;
      if (job.status === "failed") throw new ForkdApiError(500, job.error?.code ?? "internal", job.error?.message ?? "the job failed");
      await new Promise((r) => setTimeout(r, opts.intervalMs ?? 250));
    }
  }

  /** A standalone copy of a snapshot (its whole memory, no parent) under a new tag. */
  compactSnapshot(tag: string, to: string): Promise<S.SnapshotT> {
    return this.request("POST", `/v1/snapshots/${encodeURIComponent(tag)}/compact`, { to });
  }

  /** ready, writing (a BRANCH still materialising) or failed, with the reason. */
  snapshotStatus(tag: string): Promise<S.SnapshotStatusT> {
    return this.request("GET", `/v1/snapshots/${encodeURIComponent(tag)}/status`);
  }
  /** Poll until a snapshot is ready; throws if its BRANCH failed. */
  async waitForSnapshot(tag: string, opts: { timeoutMs?: number; intervalMs?: number } = {}): Promise<S.SnapshotStatusT> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10 * 60_000);
    for (;;) {
      const status = await this.snapshotStatus(tag);
      if (status.status === "ready") return status;
      if (status.status === "failed")
        throw new ForkdApiError(500, "branch_failed", `BRANCH of ${tag} failed: ${status.error ?? "unknown"}`);
      if (Date.now() > deadline) throw new ForkdApiError(504, "vm_timeout", `snapshot ${tag} was not ready in time`);
      await new Promise((r) => setTimeout(r, opts.intervalMs ?? 100));
    }
  }

  /** Users' sandboxes; with `pool: true`, the children waiting in hot pools too (their `pool` names the tag). */
  listSandboxes(opts: { pool?: boolean } & CallOpts = {}): Promise<S.SandboxT[]> {
    const { pool, ...call } = opts;
    return this.request("GET", `/v1/sandboxes${pool ? "?pool=true" : ""}`, undefined, call);
  }
  createSandboxes(body: S.CreateSandboxesBodyT, opts: CallOpts = {}): Promise<S.ForkResultT> {
    return this.request("POST", "/v1/sandboxes", body, { timeoutMs: 30 * 60_000, ...opts });
  }
  getSandbox(id: string, opts: CallOpts = {}): Promise<S.SandboxT> {
    return this.request("GET", `/v1/sandboxes/${encodeURIComponent(id)}`, undefined, opts);
  }
  deleteSandbox(id: string, opts: CallOpts = {}): Promise<void> {
    return this.request("DELETE", `/v1/sandboxes/${encodeURIComponent(id)}`, undefined, opts);
  }
  /** BRANCH a running sandbox into a new snapshot; with wait:false the answer comes as soon as the source runs again. */
  branchSandbox(id: string, body: S.BranchBodyT = {}, opts: CallOpts = {}): Promise<S.BranchResponseT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/branch`, body, { timeoutMs: 15 * 60_000, ...opts });
  }
  /**
   * Live fork-to-many: N children of the running sandbox `id` in one call. The source
   * is paused only while the pages it wrote are copied and keeps running; the
   * children see its state at that moment. The capture is registered as snapshot
   * `tag` in the background.
   */
  forkLive(id: string, body: S.ForkLiveBodyT = {}): Promise<S.ForkLiveResponseT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/fork`, body, { timeoutMs: 30 * 60_000 });
  }

  /** The cluster's live nodes (capacity, load, drain flag, snapshots each holds); a daemon outside a cluster answers not_supported. */
  clusterNodes(): Promise<S.ClusterNodeT[]> {
    return this.request("GET", "/v1/cluster/nodes");
  }
  /** Stop placing new work on `node` (draining) or place it there again; what runs there keeps running. */
  setDraining(node: string, draining: boolean): Promise<S.DrainResultT> {
    return this.request(draining ? "POST" : "DELETE", `/v1/cluster/nodes/${encodeURIComponent(node)}/drain`);
  }

  /** Hot pools: per snapshot, children kept restored and answering, handed out by forks first. */
  listPools(): Promise<S.PoolT[]> {
    return this.request("GET", "/v1/pools");
  }
  getPool(tag: string): Promise<S.PoolT> {
    return this.request("GET", `/v1/snapshots/${encodeURIComponent(tag)}/pool`);
  }
  /** Keep `size` children of `tag` ready (0 drains the pool); the daemon fills it in the background. */
  setPool(tag: string, size: number): Promise<S.PoolT> {
    return this.request("PUT", `/v1/snapshots/${encodeURIComponent(tag)}/pool`, { size });
  }
  /** Remove the pool and kill the children it holds. */
  deletePool(tag: string): Promise<void> {
    return this.request("DELETE", `/v1/snapshots/${encodeURIComponent(tag)}/pool`);
  }
  /** Poll until `tag`'s pool has `ready` children (its size by default). */
  async waitForPool(tag: string, opts: { ready?: number; timeoutMs?: number; intervalMs?: number } = {}): Promise<S.PoolT> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10 * 60_000);
    for (;;) {
      const pool = await this.getPool(tag);
      if (pool.ready >= (opts.ready ?? pool.size) && pool.size > 0) return pool;
      if (Date.now() > deadline)
        throw new ForkdApiError(504, "vm_timeout", `the pool of ${tag} has ${pool.ready} of ${opts.ready ?? pool.size} ready`);
      await new Promise((r) => setTimeout(r, opts.intervalMs ?? 200));
    }
  }

  ping(id: string, opts: CallOpts = {}): Promise<S.PingResponseT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/ping`, undefined, opts);
  }
  /** Its deadline: the command's own timeout plus the request timeout, unless `opts.timeoutMs` says otherwise. */
  exec(id: string, body: S.ExecBodyT, opts: CallOpts = {}): Promise<S.ExecResponseT> {
    const timeoutMs = (body.timeout_ms ?? 0) + this.requestTimeoutMs;
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/exec`, body, { timeoutMs, ...opts });
  }
  /** Streams output as it is produced (NDJSON under the hood) and resolves with the exit. */
  async execStream(id: string, body: S.ExecBodyT, opts: ExecStreamOpts = {}): Promise<ExecExit> {
    const res = await this.request<Response>("POST", `/v1/sandboxes/${encodeURIComponent(id)}/exec/stream`, body, {
      raw: true,
      signal: opts.signal ?? AbortSignal.timeout((body.timeout_ms ?? 24 * 3_600_000) + this.requestTimeoutMs),
    });
    return readExecEvents(res, opts, "exec");
  }

  /** exec with background: true: the process starts and its pid comes back at once; it outlives this request. */
  execBackground(id: string, body: Omit<S.ExecBodyT, "background">): Promise<S.ProcessInfoT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/exec`, { ...body, background: true });
  }
  /** Background processes of a sandbox, running and recently exited. */
  listProcesses(id: string): Promise<S.ProcessInfoT[]> {
    return this.request("GET", `/v1/sandboxes/${encodeURIComponent(id)}/processes`);
  }
  getProcess(id: string, pid: number): Promise<S.ProcessInfoT> {
    return this.request("GET", `/v1/sandboxes/${encodeURIComponent(id)}/processes/${pid}`);
  }
  /** Signal a background process's whole group (SIGKILL by default). */
  killProcess(id: string, pid: number, opts: { signal?: S.ProcessSignalT } = {}): Promise<void> {
    const query = opts.signal ? `?signal=${opts.signal}` : "";
    return this.request("DELETE", `/v1/sandboxes/${encodeURIComponent(id)}/processes/${pid}${query}`);
  }
  /** Write to a background process's stdin; `eof` closes it after. */
  sendProcessStdin(id: string, pid: number, body: S.ProcessStdinBodyT): Promise<S.ProcessStdinResponseT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/processes/${pid}/stdin`, body);
  }
  /**
   * Reattach to a background process: the output it has kept, then live output,
   * resolving with its exit. Aborting `signal` detaches; the process runs on.
   */
  async processOutput(id: string, pid: number, opts: ExecStreamOpts = {}): Promise<ExecExit> {
    const res = await this.request<Response>("GET", `/v1/sandboxes/${encodeURIComponent(id)}/processes/${pid}/output`, undefined, {
      raw: true,
      signal: opts.signal ?? new AbortController().signal,
    });
    return readExecEvents(res, opts, "process output");
  }
  eval(id: string, body: S.EvalBodyT, opts: CallOpts = {}): Promise<S.EvalResponseT> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/eval`, body, opts);
  }
  files<T = Record<string, unknown>>(id: string, body: S.FilesBodyT, opts: CallOpts = {}): Promise<T> {
    return this.request("POST", `/v1/sandboxes/${encodeURIComponent(id)}/files`, body, opts);
  }

  listWorkspaces(): Promise<S.WorkspaceT[]> {
    return this.request("GET", "/v1/workspaces");
  }
  createWorkspace(body: S.CreateWorkspaceBodyT): Promise<S.WorkspaceT> {
    return this.request("POST", "/v1/workspaces", body, { timeoutMs: 10 * 60_000 });
  }
  getWorkspace(name: string): Promise<S.WorkspaceT> {
    return this.request("GET", `/v1/workspaces/${encodeURIComponent(name)}`);
  }
  deleteWorkspace(name: string): Promise<void> {
    return this.request("DELETE", `/v1/workspaces/${encodeURIComponent(name)}`);
  }
  /** Capture the workspace's sandbox to disk and stop it. */
  suspendWorkspace(name: string, opts: { diff?: boolean } = {}): Promise<S.WorkspaceT> {
    return this.request(
      "POST",
      `/v1/workspaces/${encodeURIComponent(name)}/suspend`,
      { diff: opts.diff ?? false },
      { timeoutMs: 10 * 60_000 },
    );
  }
  resumeWorkspace(name: string): Promise<S.WorkspaceT> {
    return this.request("POST", `/v1/workspaces/${encodeURIComponent(name)}/resume`, {}, { timeoutMs: 10 * 60_000 });
  }

  // forkd v0.5.3's TypeScript SDK names, so code written for @deeplethe/forkd runs unchanged.

  /** forkd: POST /v1/sandboxes with forkd's options; the children's SandboxInfo. */
  spawnSandboxes(opts: {
    snapshotTag: string;
    n?: number;
    perChildNetns?: boolean;
    memoryLimitMib?: number;
    prewarm?: boolean;
    liveFork?: boolean;
    hugepages?: boolean;
  }): Promise<S.SandboxT[]> {
    return this.createSandboxes({
      snapshot_tag: opts.snapshotTag,
      n: opts.n ?? 1,
      per_child_netns: opts.perChildNetns ?? false,
      ...(opts.memoryLimitMib !== undefined ? { memory_limit_mib: opts.memoryLimitMib } : {}),
      ...(opts.prewarm !== undefined ? { prewarm: opts.prewarm } : {}),
      ...(opts.liveFork !== undefined ? { live_fork: opts.liveFork } : {}),
      ...(opts.hugepages !== undefined ? { hugepages: opts.hugepages } : {}),
    });
  }
  /** forkd: DELETE /v1/sandboxes/:id. */
  killSandbox(id: string): Promise<void> {
    return this.deleteSandbox(id);
  }
  /** forkd: exec an argv (no shell) with a timeout in seconds. */
  execCommand(id: string, args: string[], opts: { timeoutSecs?: number } = {}): Promise<S.ExecResponseT> {
    return this.exec(id, { args, timeout_secs: opts.timeoutSecs ?? 30 });
  }
  /** forkd: eval in the sandbox's main language; {result, error, exit_code}. */
  evalCode(id: string, code: string): Promise<S.EvalResponseT> {
    return this.eval(id, { code });
  }
  /** forkd: ping. */
  pingSandbox(id: string): Promise<S.PingResponseT> {
    return this.ping(id);
  }

  async close(): Promise<void> {
    await this.dispatcher?.close();
  }
}

/** Read an NDJSON exec or process-output stream: chunks to the callbacks, the exit line as the answer. */
async function readExecEvents(res: Response, opts: ExecStreamOpts, what: string): Promise<ExecExit> {
  if (!res.body) throw new ForkdApiError(502, "bad_gateway", "the stream had no body");
  const decoder = new TextDecoder();
  let buffered = "";
  let exit: ExecExit | undefined;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buffered += decoder.decode(chunk, { stream: true });
    let nl = buffered.indexOf("\n");
    while (nl >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf("\n");
      if (!line.trim()) continue;
      const event = JSON.parse(line) as { type: string; data?: string; error?: { code: string; message: string } } & ExecExit;
      if (event.type === "stdout") opts.onStdout?.(Buffer.from(event.data ?? "", "base64"));
      else if (event.type === "stderr") opts.onStderr?.(Buffer.from(event.data ?? "", "base64"));
      else if (event.type === "exit")
        exit = {
          exit_code: event.exit_code,
          signal: event.signal,
          timed_out: event.timed_out,
          duration_ms: event.duration_ms,
          ...(event.truncated ? { truncated: true } : {}),
        };
      else if (event.type === "error")
        throw new ForkdApiError(502, event.error?.code ?? "agent_error", event.error?.message ?? `${what} failed`);
    }
  }
  if (!exit) throw new ForkdApiError(502, "agent_error", `the ${what} stream ended without an exit status`);
  return exit;
}
