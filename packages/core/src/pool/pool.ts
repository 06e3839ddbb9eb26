// Hot pools: per snapshot tag, K children kept restored, running and answering, so a
// fork hands one out in the time of an identity call instead of a restore. What a
// pool is (its size, its children, filling, handing out, draining) lives here; when
// to refill is the daemon's scheduler, which alone keeps pools.
import { randomBytes } from "node:crypto";
import os from "node:os";
import { ForkdError } from "../common/errors.js";
import type { AgentClient } from "../guest/agent-client.js";
import { type AdmissionLedger, decide, forkNeeds, type Limits, refusalError } from "../sandbox/admission.js";
import { readCapacity, unsealedBytes, unstagedChainBytes } from "../sandbox/admission-host.js";
import { type ForkChildResult, forkSandboxes, MAX_FORK } from "../sandbox/fork.js";
import { killSandbox, reapSandbox, sandboxAlive } from "../sandbox/lifecycle.js";
import { setSandboxPriority } from "../sandbox/priority.js";
import { pooledRows, poolSettings } from "../store/pools.js";
import { getSnapshot } from "../store/snapshots.js";
import type { SandboxRow } from "../store/state.js";
import { sandboxAllows, sandboxState } from "../store/state-rules.js";

const MAX_POOL_SIZE = MAX_FORK;

export type PoolView = {
  tag: string;
  /** Children wanted. */
  size: number;
  /** Restored, answering, waiting to be handed out. */
  ready: number;
  /** Being restored right now. */
  starting: number;
  updated_at: string | null;
};

/**
 * Children that exist for `tag`'s pool, counted by phase; dead ones are reaped on the
 * way, and so are those the state table never lets a pool hand out (a guest that broke
 * the agent protocol): they would only hold a slot the refill then never fills.
 */
function poolMembers(tag: string): { ready: SandboxRow[]; starting: SandboxRow[] } {
  const ready: SandboxRow[] = [];
  const starting: SandboxRow[] = [];
  for (const row of pooledRows.of(tag)) {
    const state = sandboxState(row);
    if (state === "starting") starting.push(row);
    else if (!sandboxAlive(row)) void reapSandbox(row).catch(() => {});
    else if (!sandboxAllows(state, "claim")) void killSandbox(row.id).catch(() => {});
    else ready.push(row);
  }
  return { ready, starting };
}

export function poolView(tag: string): PoolView {
  const setting = poolSettings.get(tag);
  const { ready, starting } = poolMembers(tag);
  return { tag, size: setting?.size ?? 0, ready: ready.length, starting: starting.length, updated_at: setting?.updated_at ?? null };
}

/** Every pool with a size, and any tag still holding pooled children (being drained). */
export function listPools(): PoolView[] {
  const tags = new Set([...poolSettings.list().map((p) => p.tag), ...pooledRows.all().map((r) => r.pool!)]);
  return [...tags].sort().map(poolView);
}

/**
 * The pool size a caller may ask for: a whole number up to the daemon's sandbox
 * limit (pooled children count against it like any), for a snapshot that exists.
 */
export async function validatePoolSize(tag: string, size: unknown, limits: Pick<Limits, "maxSandboxes">): Promise<number> {
  if (typeof size !== "number" || !Number.isInteger(size) || size < 0 || size > MAX_POOL_SIZE) {
    throw new ForkdError("bad_request", `the pool size must be a whole number from 0 to ${MAX_POOL_SIZE}, got ${String(size)}`, {
      field: "size",
    });
  }
  if (size > limits.maxSandboxes) {
    throw new ForkdError(
      "bad_request",
      `a pool of ${size} is more than this daemon's limit of ${limits.maxSandboxes} sandboxes (--max-sandboxes), which pooled children count against`,
      { field: "size", limit: "max_sandboxes", max_sandboxes: limits.maxSandboxes },
    );
  }
  // 404 for an unknown tag, 409 for a BRANCH still being written.
  await getSnapshot(tag);
  return size;
}

/** Fork requests a pooled child can stand for: one with the defaults a pool is restored with. */
export function poolCanServe(opts: {
  memoryLimitMib?: number | null | undefined;
  cpuLimit?: number | undefined;
  network?: boolean | undefined;
  allowOut?: string[] | undefined;
  denyOut?: string[] | undefined;
}): boolean {
  return (
    (opts.memoryLimitMib === undefined || opts.memoryLimitMib === null) &&
    opts.cpuLimit === undefined &&
    opts.network !== false &&
    !opts.allowOut?.length &&
    !opts.denyOut?.length
  );
}

// Fills in flight in this process, by tag: a drain stops them and waits for them,
// so no child of a pool being removed is left running behind its back.
const fills = new Map<string, Set<{ abort: AbortController; done: Promise<unknown> }>>();

/** Identity and ping calls each pooled child answers after its restore (see fillPool). */
const WARM_CALLS = 3;

export type FillOpts = {
  /** The new child's agent connection (the daemon keeps one per sandbox). */
  keepAgent: (id: string, agent: AgentClient) => void;
  onChild?: (result: ForkChildResult) => void;
  concurrency?: number;
};

/**
 * Restore `n` children into `tag`'s pool at background CPU priority. Each is
 * marked pooled from its first row on, so no user ever sees it half-made; it is
 * ready (claimable) once it answered its identity, like any child.
 */
export async function fillPool(tag: string, n: number, opts: FillOpts): Promise<ForkChildResult[]> {
  const abort = new AbortController();
  let settle!: () => void;
  const entry = { abort, done: new Promise<void>((r) => (settle = r)) };
  const set = fills.get(tag) ?? new Set();
  fills.set(tag, set.add(entry));
  const agents = new Map<string, AgentClient>();
  try {
    const results = await forkSandboxes({
      tag,
      n,
      pool: tag,
      background: true,
      concurrency: opts.concurrency ?? 1,
      signal: abort.signal,
      keepAgent: (id, agent) => {
        agents.set(id, agent);
        opts.keepAgent(id, agent);
      },
      ...(opts.onChild ? { onChild: opts.onChild } : {}),
    });
    // Under TCG each VMM translates guest code afresh: run the hand-out's calls a few
    // times now, at background priority, so the one at claim finds them translated.
    await Promise.all(
      [...agents].map(async ([id, agent]) => {
        for (let i = 0; i < WARM_CALLS; i++) {
          await agent.identity({ hostname: id, entropy: randomBytes(64).toString("base64"), clockMs: Date.now() }).catch(() => {});
          await agent.ping().catch(() => {});
        }
      }),
    );
    // A pool removed while these were being restored must not keep them.
    if (!poolSettings.get(tag) || abort.signal.aborted) {
      for (const r of results) if (r.ok) await killSandbox(r.id).catch(() => {});
    }
    return results;
  } finally {
    set.delete(entry);
    if (set.size === 0) fills.delete(tag);
    settle();
  }
}

export type Claimed = { id: string; claimMs: number };
export type ClaimOpts = {
  ttlMs?: number;
  metadata?: Record<string, string>;
  /** The child's agent connection, open since it was pooled (or reconnected after a restart). */
  agentFor: (id: string) => Promise<AgentClient>;
  timeoutMs?: number;
  /** Hand-outs in flight at once; the host's cores by default. */
  concurrency?: number;
};

/**
 * Hand out up to `n` ready children of `tag`'s pool. Each is taken out of the pool
 * atomically, put back at normal CPU priority and given a fresh identity (its
 * hostname again, new entropy with a forced CRNG reseed, the clock now): two
 * children handed out never share RNG state, whatever the pool did before. A child
 * that does not answer is killed, not handed out; `failed` counts those.
 */
export async function claimPooled(tag: string, n: number, opts: ClaimOpts): Promise<{ claimed: Claimed[]; failed: number }> {
  const rows = pooledRows.claim(tag, n, {
    expires_at_ms: opts.ttlMs !== undefined ? Date.now() + opts.ttlMs : null,
    metadata: opts.metadata ? JSON.stringify(opts.metadata) : null,
  });
  const handOut = async (row: SandboxRow): Promise<Claimed | undefined> => {
    const t0 = performance.now();
    try {
      setSandboxPriority(row.pid, row.cgroup, row.vcpus, "normal");
      const agent = await opts.agentFor(row.id);
      await agent.identity(
        { hostname: row.id, entropy: randomBytes(64).toString("base64"), clockMs: Date.now() },
        { timeoutMs: opts.timeoutMs ?? 10_000 },
      );
      return { id: row.id, claimMs: performance.now() - t0 };
    } catch {
      await killSandbox(row.id).catch(() => {});
      return undefined;
    }
  };
  // As many hand-outs at once as the host has cores: more would only queue inside
  // the guests' vCPUs, making every child later and none sooner.
  const outcomes: (Claimed | undefined)[] = new Array(rows.length);
  let next = 0;
  const worker = async () => {
    while (next < rows.length) {
      const i = next++;
      outcomes[i] = await handOut(rows[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(opts.concurrency ?? os.availableParallelism(), rows.length)) }, worker));
  const claimed = outcomes.filter((c): c is Claimed => c !== undefined);
  return { claimed, failed: rows.length - claimed.length };
}

/** Kill ready children beyond `keep`, newest first (the oldest have answered most and are the warmest). */
async function trimPool(tag: string, keep: number): Promise<string[]> {
  const { ready, starting } = poolMembers(tag);
  const extra = ready.length + starting.length - keep;
  if (extra <= 0) return [];
  const victims = [...starting, ...ready.reverse()].slice(0, extra);
  for (const row of victims) await killSandbox(row.id).catch(() => {});
  return victims.map((r) => r.id);
}

/**
 * Remove `tag`'s pool: its size first (so nothing refills it), then stop the fills
 * in flight here and wait for them, then kill every child it still holds.
 */
export async function drainPool(tag: string): Promise<string[]> {
  poolSettings.remove(tag);
  const inFlight = [...(fills.get(tag) ?? [])];
  for (const f of inFlight) f.abort.abort();
  await Promise.all(inFlight.map((f) => f.done));
  const killed: string[] = [];
  for (const row of pooledRows.of(tag)) {
    await killSandbox(row.id).catch(() => {});
    killed.push(row.id);
  }
  return killed;
}

/**
 * Would `size` children fit now, beside everything running and in flight? The
 * children still to restore are sized as admission sizes any fork (503 naming the
 * resource that is short); filling is admitted again, child by child.
 */
export async function checkPoolFits(ledger: AdmissionLedger, tag: string, size: number): Promise<void> {
  const snapshot = await getSnapshot(tag);
  const { ready, starting } = poolMembers(tag);
  const more = size - ready.length - starting.length;
  if (more <= 0) return;
  const needs = forkNeeds({
    n: more,
    guestMemoryBytes: snapshot.memoryMib * 2 ** 20,
    unstagedBytes: await unstagedChainBytes(snapshot),
    unsealedBytes: unsealedBytes(snapshot),
    dirtyFraction: ledger.limits.dirtyFraction,
  });
  const verdict = decide(needs, readCapacity(), ledger.reserved(), ledger.limits);
  if (!verdict.ok) throw refusalError(verdict.refusal);
}

/** Persist a pool's size (0 removes it and drains its children); the daemon's scheduler does the filling. */
export async function setPoolSize(tag: string, size: number, limits: Pick<Limits, "maxSandboxes">): Promise<PoolView> {
  const wanted = await validatePoolSize(tag, size, limits);
  if (wanted === 0) {
    await drainPool(tag);
    return poolView(tag);
  }
  poolSettings.set(tag, wanted);
  await trimPool(tag, wanted);
  return poolView(tag);
}
