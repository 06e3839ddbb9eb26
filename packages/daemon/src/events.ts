// The event stream (GET /v1/events, server-sent events): typed state changes for
// the dashboard and any other client. Each client's backlog is bounded: one that
// reads slower than events come is dropped (its stream ended), never buffered
// without limit. Events are found by comparing the daemon's state between polls,
// so changes made anywhere (the CLI without a daemon, the reaper, a guest that
// breaks the protocol) are reported too, not only the ones routes make.
import type { ServerResponse } from "node:http";

/** The event types a client may see; `data` is JSON. */
type DaemonEventType =
  | "hello"
  | "sandbox.started"
  | "sandbox.killed"
  | "sandbox.unhealthy"
  | "snapshot.writing"
  | "snapshot.ready"
  | "snapshot.failed"
  | "snapshot.removed"
  | "pool.sizes"
  | "job.progress"
  | "metrics";

export type DaemonEvent = { type: DaemonEventType; data: Record<string, unknown> };

/** What one client's unsent backlog may hold before it is dropped as too slow. */
export const CLIENT_BACKLOG_BYTES = 256 * 1024;
/** Clients at once; one more is refused (a stream costs a poll and a buffer). */
const MAX_EVENT_CLIENTS = 64;
const HEARTBEAT_MS = 15_000;

type Client = { res: ServerResponse; dropped: boolean };

export class EventHub {
  private readonly clients = new Set<Client>();
  private seq = 0;
  private heartbeat: NodeJS.Timeout | undefined;
  /** Called with the number of clients whenever it changes (the watcher polls only while someone listens). */
  onClientCount: (n: number) => void = () => {};
  /** Slow clients dropped since the start (for tests and metrics). */
  droppedClients = 0;

  get clientCount(): number {
    return this.clients.size;
  }

  hasRoom(): boolean {
    return this.clients.size < MAX_EVENT_CLIENTS;
  }

  /** Take over a response as an SSE stream; `first` events are sent to it alone. */
  attach(res: ServerResponse, first: DaemonEvent[]): void {
    res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-store",
      "x-accel-buffering": "no",
      connection: "keep-alive",
    });
    const client: Client = { res, dropped: false };
    this.clients.add(client);
    res.on("close", () => this.remove(client));
    for (const e of first) this.send(client, this.frame(e));
    this.onClientCount(this.clients.size);
    this.heartbeat ??= setInterval(() => {
      for (const c of this.clients) this.send(c, ": keep-alive\n\n");
    }, HEARTBEAT_MS).unref();
  }

  publish(event: DaemonEvent): void {
    if (this.clients.size === 0) return;
    const text = this.frame(event);
    for (const c of this.clients) this.send(c, text);
  }

  closeAll(): void {
    for (const c of [...this.clients]) {
      c.res.end();
      this.remove(c);
    }
  }

  private frame(event: DaemonEvent): string {
    this.seq += 1;
    return `id: ${this.seq}\nevent: ${event.type}\ndata: ${JSON.stringify(event.data)}\n\n`;
  }

  private send(client: Client, text: string): void {
    if (client.dropped) return;
    // writableLength is what the socket has not taken yet: a client that stops reading grows it.
    if (client.res.writableLength + text.length > CLIENT_BACKLOG_BYTES) {
      client.dropped = true;
      this.droppedClients += 1;
      client.res.destroy();
      this.remove(client);
      return;
    }
    client.res.write(text);
  }

  private remove(client: Client): void {
    if (!this.clients.delete(client)) return;
    this.onClientCount(this.clients.size);
    if (this.clients.size === 0 && this.heartbeat) {
      clearInterval(this.heartbeat);
      this.heartbeat = undefined;
    }
  }
}

/** What the watcher compares between polls. */
export type StateSample = {
  sandboxes: Map<string, { health: string; health_reason: string | null; view: Record<string, unknown> }>;
  snapshots: Map<string, { status: string; error: string | null; view: Record<string, unknown> }>;
  pools: string;
  poolList: unknown[];
  jobs: Map<string, { key: string; view: Record<string, unknown> }>;
};

/** The events that take `before` to `after` (pure: tests call it with made-up samples). */
export function diffStates(before: StateSample, after: StateSample): DaemonEvent[] {
  const out: DaemonEvent[] = [];
  for (const [id, s] of after.sandboxes) {
    const old = before.sandboxes.get(id);
    if (!old) out.push({ type: "sandbox.started", data: s.view });
    if (s.health === "unhealthy" && old?.health !== "unhealthy") {
      out.push({ type: "sandbox.unhealthy", data: { id, reason: s.health_reason } });
    }
  }
  for (const id of before.sandboxes.keys()) if (!after.sandboxes.has(id)) out.push({ type: "sandbox.killed", data: { id } });
  for (const [tag, s] of after.snapshots) {
    const old = before.snapshots.get(tag);
    if (old?.status === s.status) continue;
    const type = s.status === "ready" ? "snapshot.ready" : s.status === "failed" ? "snapshot.failed" : "snapshot.writing";
    out.push({ type, data: s.view });
  }
  for (const tag of before.snapshots.keys()) if (!after.snapshots.has(tag)) out.push({ type: "snapshot.removed", data: { tag } });
  if (after.pools !== before.pools) out.push({ type: "pool.sizes", data: { pools: after.poolList } });
  for (const [id, j] of after.jobs) if (before.jobs.get(id)?.key !== j.key) out.push({ type: "job.progress", data: j.view });
  return out;
}

export function emptySample(): StateSample {
  return { sandboxes: new Map(), snapshots: new Map(), pools: "[]", poolList: [], jobs: new Map() };
}

/**
 * Polls `sample` while clients listen and publishes what changed, plus a metrics
 * event every `metricsEvery` polls. Stops polling when the last client leaves.
 */
export class StateWatcher {
  private last: StateSample | undefined;
  private timer: NodeJS.Timeout | undefined;
  private polls = 0;
  private busy = false;

  constructor(
    private readonly hub: EventHub,
    private readonly sample: () => Promise<StateSample>,
    private readonly metrics: () => Promise<Record<string, unknown>>,
    private readonly opts: { intervalMs: number; metricsEvery: number; log: (line: string) => void },
  ) {
    hub.onClientCount = (n) => (n > 0 ? this.start() : this.stop());
  }

  /** The current state, for a new client's first view (and the baseline of the next diff). */
  async current(): Promise<StateSample> {
    this.last ??= await this.sample();
    return this.last;
  }

  private start(): void {
    this.timer ??= setInterval(() => {
      this.tick().catch((err: Error) => this.opts.log(`forkd daemon: event watcher: ${err.message}`));
    }, this.opts.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.last = undefined;
  }

  private async tick(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      const next = await this.sample();
      if (this.last) for (const e of diffStates(this.last, next)) this.hub.publish(e);
      this.last = next;
      this.polls += 1;
      if (this.polls % this.opts.metricsEvery === 0) this.hub.publish({ type: "metrics", data: await this.metrics() });
    } catch (err) {
      this.opts.log(`forkd daemon: event watcher: ${(err as Error).message}`);
    } finally {
      this.busy = false;
    }
  }
}
