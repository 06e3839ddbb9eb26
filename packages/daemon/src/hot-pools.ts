// The daemon's hot-pool scheduler: when to refill which pool. What a pool is lives
// in core (pool/pool.ts); here, one loop restores the missing children of every
// pool a few at a time, at background CPU priority, admitted like any fork, and
// stepping aside while users' forks are in flight and for a moment after, so a
// refill never competes with the work the pool exists to speed up.
import os from "node:os";
import {
  type AdmissionLedger,
  admitFork,
  type Claimed,
  checkPoolFits,
  claimPooled,
  drainPool,
  ForkdError,
  fillPool,
  listPools,
  type PoolView,
  poolSettings,
  poolView,
  setPoolSize,
  validatePoolSize,
} from "@forkd/core";
import type { AgentConnections } from "./agent-connections.js";
import type { Metrics } from "./metrics.js";
import type { LatencyWindow } from "./usage.js";

/** A refill starts no sooner than this after the last user fork or claim ended. */
const REFILL_QUIET_MS = 500;
/** With a pool configured, how often it is checked for children that died (a kill by id, a crash). */
const CHECK_MS = 5000;
/** Longest wait after failed refills of a tag (doubling from 1 s). */
const MAX_BACKOFF_MS = 60_000;

export type HotPoolsDeps = {
  agents: AgentConnections;
  admission: AdmissionLedger;
  metrics: Metrics;
  /** Hand-out latencies for GET /v1/metrics/summary (the dashboard's pools). */
  poolClaims: LatencyWindow;
  log: (line: string) => void;
};

export class HotPools {
  private userForks = 0;
  private quietUntil = 0;
  private wake: (() => void) | undefined;
  private closed = false;
  private loop: Promise<void> | undefined;
  private readonly backoff = new Map<string, { failures: number; until: number }>();
  /** Restores in flight per refill step: as many as the host has cores. */
  private readonly batch = Math.max(1, Math.min(4, os.availableParallelism()));

  constructor(private readonly deps: HotPoolsDeps) {}

  start(): void {
    this.loop ??= this.run();
  }

  async close(): Promise<void> {
    this.closed = true;
    this.kick();
    await this.loop;
  }

  /** Something changed (a size, a claim, a kill): look at the pools again now. */
  kick(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }

  /** Run a user's fork with refills held back until it is over (and REFILL_QUIET_MS after). */
  async userFork<T>(work: () => Promise<T>): Promise<T> {
    this.userForks++;
    try {
      return await work();
    } finally {
      this.userForks--;
      this.quietUntil = Date.now() + REFILL_QUIET_MS;
      this.kick();
    }
  }

  get(tag: string): PoolView {
    return poolView(tag);
  }

  list(): PoolView[] {
    return listPools();
  }

  /** Set a pool's size (400 over the sandbox limit, 503 when what is missing cannot fit now); 0 drains it. */
  async set(tag: string, size: number): Promise<PoolView> {
    const wanted = await validatePoolSize(tag, size, this.deps.admission.limits);
    if (wanted > 0) await checkPoolFits(this.deps.admission, tag, wanted);
    const view = await setPoolSize(tag, wanted, this.deps.admission.limits);
    this.backoff.delete(tag);
    this.kick();
    return view;
  }

  /** Remove a pool and kill its children; the ids killed. */
  async remove(tag: string): Promise<string[]> {
    const killed = await drainPool(tag);
    for (const id of killed) this.deps.agents.drop(id);
    this.backoff.delete(tag);
    return killed;
  }

  /** Hand out up to `n` of `tag`'s pooled children (none if it has no pool). */
  async claim(tag: string, n: number, opts: { ttlMs?: number; metadata?: Record<string, string> }): Promise<Claimed[]> {
    if (!poolSettings.get(tag)) return [];
    const { claimed, failed } = await claimPooled(tag, n, { ...opts, agentFor: (id) => this.deps.agents.get(id) });
    for (const c of claimed) {
      this.deps.metrics.poolClaimSeconds.observe(c.claimMs / 1000);
      this.deps.poolClaims.record(c.claimMs);
    }
    if (failed > 0) this.deps.log(`forkd daemon: ${failed} pooled child(ren) of ${tag} did not answer at hand-out and were killed`);
    this.quietUntil = Date.now() + REFILL_QUIET_MS;
    this.kick();
    return claimed;
  }

  private sleep(ms: number | undefined): Promise<void> {
    return new Promise((resolve) => {
      const timer = ms === undefined ? undefined : setTimeout(resolve, ms);
      timer?.unref();
      this.wake = () => {
        if (timer) clearTimeout(timer);
        resolve();
      };
    });
  }

  /** The pool missing most children (that is not backing off), and how many to restore now. */
  private next(): { tag: string; n: number } | { waitMs: number } | undefined {
    let best: { tag: string; missing: number } | undefined;
    let soonest: number | undefined;
    const now = Date.now();
    for (const setting of poolSettings.list()) {
      const view = poolView(setting.tag);
      const missing = setting.size - view.ready - view.starting;
      if (missing <= 0) continue;
      const off = this.backoff.get(setting.tag);
      if (off && off.until > now) {
        soonest = Math.min(soonest ?? off.until, off.until);
        continue;
      }
      if (!best || missing > best.missing) best = { tag: setting.tag, missing };
    }
    if (best) return { tag: best.tag, n: Math.min(best.missing, this.batch) };
    return soonest !== undefined ? { waitMs: soonest - now } : undefined;
  }

  private async run(): Promise<void> {
    while (!this.closed) {
      let next: ReturnType<HotPools["next"]>;
      try {
        next = this.next();
      } catch (err) {
        this.deps.log(`forkd daemon: hot pools: ${(err as Error).message}`);
        next = undefined;
      }
      if (!next) {
        await this.sleep(poolSettings.list().length > 0 ? CHECK_MS : undefined);
        continue;
      }
      if ("waitMs" in next) {
        await this.sleep(Math.min(next.waitMs, CHECK_MS));
        continue;
      }
      if (this.userForks > 0) {
        await this.sleep(CHECK_MS);
        continue;
      }
      const quiet = this.quietUntil - Date.now();
      if (quiet > 0) {
        await this.sleep(quiet);
        continue;
      }
      await this.fill(next.tag, next.n);
    }
  }

  private async fill(tag: string, n: number): Promise<void> {
    try {
      const ticket = await admitFork(this.deps.admission, { tag, n });
      try {
        const results = await fillPool(tag, n, {
          concurrency: n,
          keepAgent: (id, agent) => this.deps.agents.adopt(id, agent),
          onChild: (child) => {
            if (child.ok) this.deps.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
          },
        });
        const failed = results.filter((r) => !r.ok);
        if (failed.length === results.length) {
          const first = failed[0];
          throw new ForkdError("vm_start_failed", first && !first.ok ? first.error.message : "no child was restored");
        }
        this.backoff.delete(tag);
      } finally {
        ticket.release();
      }
    } catch (err) {
      const e = err as ForkdError;
      if (e.code === "snapshot_not_found") {
        // Its snapshot was removed by someone who could not drain it (no daemon then): nothing to refill from.
        this.deps.log(`forkd daemon: the pool of ${tag} is removed: ${e.message}`);
        await this.remove(tag).catch(() => {});
        return;
      }
      const failures = (this.backoff.get(tag)?.failures ?? 0) + 1;
      const waitMs = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** (failures - 1));
      this.backoff.set(tag, { failures, until: Date.now() + waitMs });
      this.deps.log(`forkd daemon: refilling the pool of ${tag} failed (${e.message}); next try in ${Math.round(waitMs / 1000)} s`);
    }
  }
}
