// A guest that turns hostile: a program inside it kills the forkd agent, takes its
// virtio-serial port and sends what an attacker would. Real VMs, a real daemon
// process. For every attack: the daemon stays up, another sandbox on it keeps
// answering in its usual time, the daemon's RSS grows by less than 64 MiB, and the
// hostile sandbox is reported unhealthy (with a reason) and refused from then on.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
// An agent silent for this long after a cancel is given up on (30 s by default; shorter keeps the suite quick).
process.env.FORKD_AGENT_GRACE_MS = "4000";
// A small output cap, so the cap is reached quickly under TCG.
const MAX_OUTPUT = 1024 * 1024;
process.env.FORKD_MAX_OUTPUT_BYTES = String(MAX_OUTPUT);

const TAG = "hostile-warm";
const ROGUE = fs.readFileSync(path.join(path.dirname(fileURLToPath(import.meta.url)), "rogue-agent.mjs"), "utf8");
const RSS_BUDGET_BYTES = 64 * 2 ** 20;
const PING_DEADLINE_MS = 10_000;

let daemon: DaemonHandle;
let bystander: string;
let pool: string[] = [];
let baselineRss = 0;
let baselinePingMs = 0;
/** Left unhealthy (not killed) so the restart can show it is neither reconnected to nor forgotten. */
let floodVictim: string | undefined;
const report: Record<string, unknown>[] = [];

type Res = { status: number; body: Record<string, unknown>; text: string; ms: number };

async function call(method: string, route: string, body?: unknown): Promise<Res> {
  const t0 = performance.now();
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${daemon.token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  let parsed: Record<string, unknown> = {};
  try {
    parsed = JSON.parse(text) as Record<string, unknown>;
  } catch {
    // not JSON (a stream)
  }
  return { status: res.status, body: parsed, text, ms: performance.now() - t0 };
}

/** The daemon's resident memory; 0 once it has exited. */
function daemonRss(): number {
  try {
    const status = fs.readFileSync(`/proc/${daemon.child.pid}/status`, "utf8");
    return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

function header(length: number): Buffer {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(length);
  return h;
}

function rawFrame(body: string): Buffer {
  return Buffer.concat([header(Buffer.byteLength(body)), Buffer.from(body)]);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;

async function ping(id: string): Promise<Res> {
  return call("POST", `/v1/sandboxes/${id}/ping`);
}

/** Until the rogue has the port, the real agent answers; the first ping it leaves unanswered is the rogue's. */
async function pingUntilUnanswered(id: string): Promise<Res> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const res = await ping(id);
    if (res.status !== 200 || Date.now() > deadline) return res;
    await new Promise((r) => setTimeout(r, 200));
  }
}

type Watch = { rtts: number[]; failures: string[]; startRss: number; maxRss: number };
const watchers = new Set<() => Promise<Watch>>();

/**
 * Ping the bystander back to back until stopped: how the rest of the daemon fares
 * during an attack, and the daemon's peak RSS against its RSS when the attack began.
 */
function watchBystander(): () => Promise<Watch> {
  const rtts: number[] = [];
  const failures: string[] = [];
  const startRss = daemonRss();
  let maxRss = startRss;
  let running = true;
  const loop = (async () => {
    while (running) {
      const res = await ping(bystander).catch((err: Error) => ({ status: 0, text: err.message, ms: 0 }) as Res);
      if (res.status === 200) rtts.push(res.ms);
      else failures.push(`${res.status} ${res.text.slice(0, 200)}`);
      maxRss = Math.max(maxRss, daemonRss());
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  const stop = async () => {
    watchers.delete(stop);
    running = false;
    await loop;
    return { rtts, failures, startRss, maxRss: Math.max(maxRss, daemonRss()) };
  };
  watchers.add(stop);
  return stop;
}

/** The body of a chunked HTTP/1.1 response (the text after its headers). */
function dechunk(text: string): string {
  let out = "";
  let offset = 0;
  for (;;) {
    const eol = text.indexOf("\r\n", offset);
    const size = Number.parseInt(text.slice(offset, eol), 16);
    if (eol < 0 || !(size > 0)) return out;
    out += text.slice(eol + 2, eol + 2 + size);
    offset = eol + 2 + size + 2;
  }
}

/** Put the rogue program in a sandbox and start it; it takes the agent's port after `delayMs`. */
async function turnHostile(id: string, mode: string, payload: Buffer = Buffer.alloc(0), delayMs = 300): Promise<void> {
  const written = await call("POST", `/v1/sandboxes/${id}/files`, { action: "write", path: "/root/rogue.mjs", data: ROGUE });
  expect(written.status, written.text).toBe(200);
  const args = [mode, String(delayMs), payload.toString("base64")].join(" ");
  const started = await call("POST", `/v1/sandboxes/${id}/exec`, {
    cmd: `/opt/forkd/bin/node /root/rogue.mjs ${args} </dev/null >/root/rogue.log 2>&1 &`,
  });
  expect(started.status, started.text).toBe(200);
}

async function waitUnhealthy(id: string, ms = 60_000): Promise<Record<string, unknown>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const res = await call("GET", `/v1/sandboxes/${id}`);
    expect(res.status, res.text).toBe(200);
    if (res.body.health === "unhealthy") return res.body;
    if (Date.now() > deadline) throw new Error(`sandbox ${id} was not marked unhealthy: ${res.text}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** What every attack must leave true. */
async function expectContained(name: string, id: string, watch: Watch, opts: { kill?: boolean } = {}) {
  expect(daemon.child.exitCode, daemon.stderr()).toBeNull();
  expect((await call("GET", "/healthz")).status).toBe(200);
  const view = await waitUnhealthy(id);
  expect(view.health_reason).toEqual(expect.any(String));
  expect((view.health_reason as string).length).toBeGreaterThan(5);
  // Refused at once, not reconnected into the same guest.
  const refused = await ping(id);
  expect(refused.status, refused.text).toBe(409);
  expect(refused.body.code).toBe("invalid_state");
  expect(refused.text).toContain(view.health_reason as string);
  expect(refused.ms).toBeLessThan(2000);
  expect(watch.failures).toEqual([]);
  expect(watch.rtts.length).toBeGreaterThan(0);
  const p50 = median(watch.rtts);
  const max = Math.max(...watch.rtts);
  const rssGrowth = watch.maxRss - watch.startRss;
  report.push({
    attack: name,
    reason: view.health_reason,
    bystander_pings: watch.rtts.length,
    bystander_p50_ms: Math.round(p50),
    bystander_max_ms: Math.round(max),
    daemon_rss_growth_mib: Math.round((rssGrowth / 2 ** 20) * 10) / 10,
  });
  expect(p50).toBeLessThan(baselinePingMs * 3 + 150);
  expect(max).toBeLessThan(3000);
  expect(rssGrowth).toBeLessThan(RSS_BUDGET_BYTES);
  if (opts.kill !== false) expect((await call("DELETE", `/v1/sandboxes/${id}`)).status).toBe(204);
}

function take(): string {
  const id = pool.shift();
  if (!id) throw new Error("no sandbox left in the pool");
  return id;
}

/** Fork `n` children, each group just before it is needed: idle TCG guests still cost CPU. */
async function forkSome(n: number): Promise<string[]> {
  const forked = await call("POST", "/v1/sandboxes", { snapshot_tag: TAG, n });
  expect(forked.status, forked.text).toBe(201);
  const ids = (forked.body as unknown as { id: string }[]).map((s) => s.id);
  expect(ids.length).toBe(n);
  return ids;
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
  const snap = await call("POST", "/v1/snapshots", { tag: TAG });
  expect(snap.status, snap.text).toBe(201);
  [bystander, ...pool] = (await forkSome(9)) as [string, ...string[]];
  const rtts: number[] = [];
  for (let i = 0; i < 10; i++) {
    const res = await ping(bystander);
    expect(res.status).toBe(200);
    rtts.push(res.ms);
  }
  baselinePingMs = median(rtts);
  baselineRss = daemonRss();
  report.push({ baseline_bystander_p50_ms: Math.round(baselinePingMs), baseline_daemon_rss_mib: Math.round(baselineRss / 2 ** 20) });
}, 600_000);

afterEach(async () => {
  // A failed test leaves its watcher running; it must not outlive the test.
  for (const stop of [...watchers]) await stop();
});

afterAll(async () => {
  report.push({ final_daemon_rss_mib: daemon?.child.exitCode === null ? Math.round(daemonRss() / 2 ** 20) : null });
  process.stderr.write(`rogue-guest report:\n${report.map((r) => JSON.stringify(r)).join("\n")}\n`);
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
});

describe("a guest that breaks the frame protocol", () => {
  const cases: [string, Buffer][] = [
    ["null", rawFrame("null")],
    ["a number", rawFrame("42")],
    ["a string", rawFrame('"hello"')],
    ["an array", rawFrame('[{"id":1,"kind":"result","value":1}]')],
    ["an id that is a string", rawFrame('{"id":"1","kind":"result","value":{}}')],
    ["an unknown kind", rawFrame('{"id":1,"kind":"surprise","value":1}')],
    ["chunk data that is not base64", rawFrame('{"id":1,"kind":"chunk","stream":"stdout","data":"%%%%"}')],
    ["a length prefix of 2^31", Buffer.concat([header(2 ** 31), Buffer.alloc(64, 0x41)])],
  ];
  for (const [name, bytes] of cases) {
    it(`sending ${name}: closed, marked unhealthy, nobody else affected`, async () => {
      const id = take();
      await turnHostile(id, "raw", bytes);
      const stop = watchBystander();
      await waitUnhealthy(id);
      await expectContained(name, id, await stop());
    });
  }
});

describe("a guest that floods, answers wrongly or falls silent", () => {
  beforeAll(async () => {
    pool.push(...(await forkSome(4)));
  });

  it("a flood of chunks for an id nobody asked about", async () => {
    const id = take();
    await turnHostile(id, "flood");
    const stop = watchBystander();
    await waitUnhealthy(id);
    // Kept alive until the restart below, which must not reconnect to it.
    await expectContained("flood of unsolicited chunks", id, await stop(), { kill: false });
    floodVictim = id;
  });

  it("replies carrying the id of another, finished call", async () => {
    const id = take();
    await turnHostile(id, "wrong-id");
    const stop = watchBystander();
    // The rogue answers the first ping well (so this is its port now) and the next with the first one's id.
    let first: Res | undefined;
    for (let i = 0; i < 150 && first?.body.hostname !== "rogue"; i++) {
      first = await ping(id);
      if (first.body.hostname !== "rogue") await new Promise((r) => setTimeout(r, 200));
    }
    expect(first?.body.hostname).toBe("rogue");
    const second = await ping(id);
    expect(second.status, second.text).toBe(502);
    expect(second.body.code).toBe("agent_error");
    await expectContained("reply for another call's id", id, await stop());
  });

  it("a frame cut in half then silence, and an agent that never answers: calls end at their deadline", async () => {
    const half = take();
    const silent = take();
    await turnHostile(half, "raw", Buffer.concat([header(100), Buffer.alloc(50, 0x7b)]));
    await turnHostile(silent, "silent");
    const stop = watchBystander();
    const [a, b] = await Promise.all([pingUntilUnanswered(half), pingUntilUnanswered(silent)]);
    for (const res of [a, b]) {
      expect(res.status, res.text).toBe(504);
      expect(res.body.code).toBe("vm_timeout");
      expect(res.ms).toBeGreaterThan(PING_DEADLINE_MS - 500);
      expect(res.ms).toBeLessThan(PING_DEADLINE_MS + 3000);
    }
    const watch = await stop();
    await expectContained("frame cut in half, then silence", half, watch);
    expect((await call("GET", `/v1/sandboxes/${half}`)).status).toBe(404);
    await expectContained("never-answering agent", silent, watch);
  });
});

describe("output the daemon must not hoard", () => {
  let worker: string;
  beforeAll(async () => {
    [worker] = (await forkSome(1)) as [string];
  });
  afterAll(async () => {
    await call("DELETE", `/v1/sandboxes/${worker}`);
  });

  it("caps a buffered exec's output and says it was truncated", async () => {
    const res = await call("POST", `/v1/sandboxes/${worker}/exec`, { cmd: "yes | head -c 3000000" });
    expect(res.status, res.text).toBe(200);
    expect(res.body.truncated).toBe(true);
    expect((res.body.stdout as string).length).toBe(MAX_OUTPUT);
    const small = await call("POST", `/v1/sandboxes/${worker}/exec`, { cmd: "echo hi" });
    expect(small.body).toMatchObject({ stdout: "hi\n", truncated: false, exit_code: 0 });
  });

  it("a streaming client that reads nothing costs bounded memory and gets a truncation marker", async () => {
    const bytes = 16_000_000;
    // The unix socket: loopback TCP may buffer 30 MB in the kernel before the daemon sees a slow reader.
    const socket = net.createConnection({ path: daemon.socket });
    await new Promise((r) => socket.once("connect", r));
    const body = JSON.stringify({ cmd: `yes | head -c ${bytes}` });
    socket.write(
      `POST /v1/sandboxes/${worker}/exec/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${daemon.token}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    );
    socket.pause();
    const stop = watchBystander();
    // The command is done once no `yes` runs in the guest any more.
    const deadline = Date.now() + 120_000;
    for (;;) {
      const running = await call("POST", `/v1/sandboxes/${worker}/exec`, { cmd: "ps | grep -q '[y]es'" });
      if (running.body.exit_code === 1 || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    // Output already queued in the guest may still be on its way.
    await new Promise((r) => setTimeout(r, 3000));
    const watch = await stop();
    let received = "";
    socket.setEncoding("utf8").on("data", (d: string) => (received += d));
    socket.resume();
    await new Promise((r) => socket.once("close", r));
    const lines = dechunk(received.slice(received.indexOf("\r\n\r\n") + 4))
      .split("\n")
      .filter((l) => l.trim() !== "")
      .map((l) => JSON.parse(l) as { type: string; data?: string; dropped_bytes?: number; truncated?: boolean });
    const dropped = lines.filter((l) => l.type === "truncated").reduce((sum, l) => sum + (l.dropped_bytes ?? 0), 0);
    const delivered = lines.filter((l) => l.type === "stdout").reduce((sum, l) => sum + Buffer.from(l.data ?? "", "base64").length, 0);
    const exit = lines.find((l) => l.type === "exit");
    report.push({
      attack: "stream client that never reads",
      output_bytes: bytes,
      delivered_bytes: delivered,
      dropped_bytes: dropped,
      daemon_rss_growth_mib: Math.round(((watch.maxRss - watch.startRss) / 2 ** 20) * 10) / 10,
    });
    expect(exit).toMatchObject({ truncated: true });
    // Every byte is either delivered or counted in a marker: nothing is lost silently.
    expect(delivered + dropped).toBe(bytes);
    expect(dropped).toBeGreaterThan(bytes / 2);
    expect(watch.maxRss - watch.startRss).toBeLessThan(RSS_BUDGET_BYTES);
    expect(watch.failures).toEqual([]);
  }, 240_000);

  it("a streaming client that disconnects cancels its command in the guest", async () => {
    const abort = new AbortController();
    const res = await fetch(`${daemon.url}/v1/sandboxes/${worker}/exec/stream`, {
      method: "POST",
      headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
      body: JSON.stringify({ cmd: "echo started; exec sleep 4242" }),
      signal: abort.signal,
    });
    const reader = res.body!.getReader();
    const first = await reader.read();
    expect(new TextDecoder().decode(first.value)).toContain('"type":"stdout"');
    const before = await call("POST", `/v1/sandboxes/${worker}/exec`, { cmd: "ps | grep -q '[s]leep 4242'" });
    expect(before.body.exit_code).toBe(0);
    abort.abort();
    const deadline = Date.now() + 10_000;
    let gone = false;
    while (!gone && Date.now() < deadline) {
      const check = await call("POST", `/v1/sandboxes/${worker}/exec`, { cmd: "ps | grep -q '[s]leep 4242'" });
      gone = check.body.exit_code === 1;
      if (!gone) await new Promise((r) => setTimeout(r, 200));
    }
    expect(gone).toBe(true);
  });
});

describe("a healthy guest is not taken for a hostile one", () => {
  it("children of a BRANCH taken mid-exec inherit the running command, not its output, and stay healthy", async () => {
    const [source] = (await forkSome(1)) as [string];
    const abort = new AbortController();
    const res = await fetch(`${daemon.url}/v1/sandboxes/${source}/exec/stream`, {
      method: "POST",
      headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
      body: JSON.stringify({ cmd: "yes mid-exec" }),
      signal: abort.signal,
    });
    const reader = res.body!.getReader();
    let streamed = 0;
    const reading = (async () => {
      for (;;) {
        const { done, value } = await reader.read().catch(() => ({ done: true, value: undefined }));
        if (done) return;
        streamed += value?.length ?? 0;
      }
    })();
    while (streamed < 100_000) await new Promise((r) => setTimeout(r, 50));
    const branched = await call("POST", `/v1/sandboxes/${source}/branch`, { tag: "mid-exec", mode: "full" });
    expect(branched.status, branched.text).toBe(201);
    abort.abort();
    await reading;
    const forked = await call("POST", "/v1/sandboxes", { snapshot_tag: "mid-exec", n: 1 });
    expect(forked.status, forked.text).toBe(201);
    const child = (forked.body as unknown as { id: string }[])[0]!.id;
    // The inherited `yes` runs on in the child; none of its output may reach the child's host.
    await new Promise((r) => setTimeout(r, 3000));
    expect((await ping(child)).status).toBe(200);
    const echo = await call("POST", `/v1/sandboxes/${child}/exec`, { cmd: "echo ok" });
    expect(echo.body).toMatchObject({ stdout: "ok\n", exit_code: 0 });
    const view = await call("GET", `/v1/sandboxes/${child}`);
    expect(view.body).toMatchObject({ health: "healthy", health_reason: null });
    for (const id of [child, source]) expect((await call("DELETE", `/v1/sandboxes/${id}`)).status).toBe(204);
  });
});

describe("a daemon restart", () => {
  it("re-adopts a guest that turned hostile while it was down without crashing, and keeps refusing unhealthy ones", async () => {
    const [victim] = (await forkSome(1)) as [string];
    // The rogue takes the port after the daemon is gone; its `null` waits for the next host to attach.
    await turnHostile(victim, "raw-loop", rawFrame("null"), 1500);
    await stopDaemon(daemon, "SIGKILL");
    await new Promise((r) => setTimeout(r, 4000));
    daemon = await startDaemonProcess(env.runDir);
    expect(daemon.child.exitCode).toBeNull();
    const stop = watchBystander();
    await waitUnhealthy(victim);
    const watch = await stop();
    expect(daemon.stderr()).toMatch(new RegExp(`could not reconnect to ${floodVictim}: .*unhealthy`));
    await expectContained("hostile at re-adoption", victim, watch);
    // Marked before the restart, still refused after it: health is durable.
    const old = await ping(floodVictim!);
    expect(old.status).toBe(409);
    const ls = spawnSync(process.execPath, [CLI, "ls"], { env: { ...process.env, FORKD_TOKEN: daemon.token }, encoding: "utf8" });
    expect(ls.stdout).toMatch(new RegExp(`${floodVictim}.*unhealthy`));
    expect((await call("DELETE", `/v1/sandboxes/${floodVictim}`)).status).toBe(204);
    expect(fs.readFileSync(daemon.audit, "utf8")).toMatch(new RegExp(`"event":"sandbox_unhealthy","sandboxes":\\["${victim}"\\]`));
  });
});
