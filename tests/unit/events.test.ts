// The event stream and the dashboard's static files, on the real server (no VM):
// GET /v1/events needs the token like every route, a client that never reads is
// dropped once its backlog passes the bound (and a reading one is not), the state
// differ names each change, and /ui is served without the token behind a CSP.
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { buildServer, createServerContext, type ServerContext } from "@forkd/daemon";
import { CLIENT_BACKLOG_BYTES, diffStates, emptySample, type StateSample } from "@forkd/daemon/events";
import type { FastifyInstance } from "fastify";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const TOKEN = "events-test-token-0123456789abcdef";

let root: string;
let ctx: ServerContext;
let app: FastifyInstance;
let base: string;

beforeAll(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-events-"));
  process.env.FORKD_HOME = path.join(root, "home");
  process.env.FORKD_RUN_DIR = path.join(root, "run");
  fs.mkdirSync(process.env.FORKD_HOME, { mode: 0o700 });
  fs.mkdirSync(process.env.FORKD_RUN_DIR, { mode: 0o700 });
  ctx = createServerContext({ token: TOKEN, auditLog: undefined, log: () => {} });
  app = await buildServer(ctx, { requireToken: true });
  await app.listen({ host: "127.0.0.1", port: 0 });
  const address = app.server.address() as net.AddressInfo;
  base = `http://127.0.0.1:${address.port}`;
});

afterAll(async () => {
  ctx?.events.closeAll();
  ctx?.watcher.stop();
  await app?.close();
  fs.rmSync(root, { recursive: true, force: true });
});

/** A raw client: sends the request and then reads (or not) as told. */
function rawClient(pathname: string, read: boolean): Promise<{ socket: net.Socket; received: () => string }> {
  return new Promise((resolve, reject) => {
    const url = new URL(base);
    const socket = net.connect(Number(url.port), url.hostname);
    let text = "";
    socket.once("error", reject);
    socket.once("connect", () => {
      socket.write(`GET ${pathname} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n\r\n`);
      if (read) socket.on("data", (d: Buffer) => (text += d.toString("latin1")));
      else {
        // Read only the response head, then never again.
        socket.once("data", (d: Buffer) => {
          text += d.toString("latin1");
          socket.pause();
        });
      }
      const wait = setInterval(() => {
        if (text.includes("event: hello")) {
          clearInterval(wait);
          resolve({ socket, received: () => text });
        }
      }, 10);
    });
  });
}

const tick = () => new Promise((r) => setImmediate(r));

describe("GET /v1/events", () => {
  it("needs the token, then streams server-sent events starting with hello", async () => {
    expect((await fetch(`${base}/v1/events`)).status).toBe(401);
    const abort = new AbortController();
    const res = await fetch(`${base}/v1/events`, { headers: { authorization: `Bearer ${TOKEN}` }, signal: abort.signal });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/^text\/event-stream/);
    const reader = res.body!.getReader();
    const { value } = await reader.read();
    expect(new TextDecoder().decode(value)).toMatch(/^id: \d+\nevent: hello\ndata: \{.*\}\n\n/);
    abort.abort();
  });

  it("drops a client that never reads once its backlog passes the bound, and keeps one that reads", async () => {
    const slow = await rawClient("/v1/events", false);
    const fast = await rawClient("/v1/events", true);
    expect(ctx.events.clientCount).toBe(2);
    const droppedBefore = ctx.events.droppedClients;
    const payload = "x".repeat(64 * 1024);
    let sent = 0;
    // Far more than any socket buffers hold: the silent client must go, the reader must not.
    for (let i = 0; i < 800 && ctx.events.clientCount > 1; i++) {
      ctx.events.publish({ type: "metrics", data: { payload, i } });
      sent += payload.length;
      await tick();
    }
    expect(ctx.events.droppedClients).toBe(droppedBefore + 1);
    expect(ctx.events.clientCount).toBe(1);
    // Dropped within socket buffers + the bound, not after everything was queued for it.
    expect(sent).toBeLessThan(48 * 1024 * 1024);
    await new Promise((r) => setTimeout(r, 200));
    expect(fast.received()).toContain(`"i":${Math.floor(sent / payload.length) - 1}`);
    expect(CLIENT_BACKLOG_BYTES).toBe(256 * 1024);
    fast.socket.destroy();
    slow.socket.destroy();
  });
});

describe("the state differ", () => {
  const sample = (over: Partial<StateSample>): StateSample => ({ ...emptySample(), ...over });
  it("names sandboxes started, killed and turned unhealthy, snapshots by status, pools and job progress", () => {
    const view = (id: string) => ({ id });
    const before = sample({
      sandboxes: new Map([
        ["sb-a", { health: "healthy", health_reason: null, view: view("sb-a") }],
        ["sb-b", { health: "healthy", health_reason: null, view: view("sb-b") }],
      ]),
      snapshots: new Map([
        ["warm", { status: "ready", error: null, view: { tag: "warm" } }],
        ["br", { status: "writing", error: null, view: { tag: "br" } }],
        ["gone", { status: "ready", error: null, view: { tag: "gone" } }],
      ]),
    });
    const after = sample({
      sandboxes: new Map([
        ["sb-a", { health: "unhealthy", health_reason: "oversize frame", view: view("sb-a") }],
        ["sb-c", { health: "healthy", health_reason: null, view: view("sb-c") }],
      ]),
      snapshots: new Map([
        ["warm", { status: "ready", error: null, view: { tag: "warm" } }],
        ["br", { status: "ready", error: null, view: { tag: "br" } }],
        ["bad", { status: "failed", error: "disk full", view: { tag: "bad" } }],
      ]),
      pools: '[{"tag":"warm","size":2}]',
      poolList: [{ tag: "warm", size: 2 }],
      jobs: new Map([["job-1", { key: "running 10 writing", view: { id: "job-1" } }]]),
    });
    const events = diffStates(before, after).map((e) => `${e.type} ${JSON.stringify(e.data)}`);
    expect(events.sort()).toEqual(
      [
        'sandbox.unhealthy {"id":"sb-a","reason":"oversize frame"}',
        'sandbox.started {"id":"sb-c"}',
        'sandbox.killed {"id":"sb-b"}',
        'snapshot.ready {"tag":"br"}',
        'snapshot.failed {"tag":"bad"}',
        'snapshot.removed {"tag":"gone"}',
        'pool.sizes {"pools":[{"tag":"warm","size":2}]}',
        'job.progress {"id":"job-1"}',
      ].sort(),
    );
    expect(diffStates(after, after)).toEqual([]);
  });
});

describe("/ui", () => {
  it("is served without the token, behind a CSP that allows no inline script, and only the built files", async () => {
    const page = await fetch(`${base}/ui`);
    expect(page.status).toBe(200);
    const csp = page.headers.get("content-security-policy") ?? "";
    expect(csp).toContain("script-src 'self'");
    expect(csp).not.toMatch(/script-src[^;]*unsafe-inline/);
    expect(csp).toContain("frame-ancestors 'none'");
    const html = await page.text();
    expect(html).toContain('<script type="module" src="/ui/app.js"></script>');
    expect(html).not.toMatch(/<script>(?!<\/script>)/);
    expect((await fetch(`${base}/ui/app.js`)).headers.get("content-type")).toMatch(/^text\/javascript/);
    expect((await fetch(`${base}/ui/..%2Fpackage.json`)).status).toBe(404);
    expect((await fetch(`${base}/ui/nope.js`)).status).toBe(404);
    // The API itself still needs the token.
    expect((await fetch(`${base}/v1/sandboxes`)).status).toBe(401);
  });
});

describe("/v1/metrics/summary", () => {
  it("carries the pool hand-out latency over the recorded window: null before any, then p50/p99 of what was handed out", async () => {
    const get = async () => {
      const res = await fetch(`${base}/v1/metrics/summary`, { headers: { authorization: `Bearer ${TOKEN}` } });
      expect(res.status).toBe(200);
      return (await res.json()) as { pool_claim_p50_ms: number | null; pool_claim_p99_ms: number | null; pool_claims_seen: number };
    };
    const before = await get();
    expect(before).toMatchObject({ pool_claim_p50_ms: null, pool_claim_p99_ms: null, pool_claims_seen: 0 });
    for (const ms of [3, 4, 5, 2, 40]) ctx.poolClaims.record(ms);
    expect(await get()).toMatchObject({ pool_claim_p50_ms: 4, pool_claim_p99_ms: 40, pool_claims_seen: 5 });
    // Only the newest 512 count: older hand-outs drop out of the percentiles.
    for (let i = 0; i < 512; i++) ctx.poolClaims.record(1);
    expect(await get()).toMatchObject({ pool_claim_p50_ms: 1, pool_claim_p99_ms: 1, pool_claims_seen: 512 });
  });
});
