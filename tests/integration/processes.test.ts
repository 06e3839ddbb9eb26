// Background processes against real VMs and a real daemon: start one (its pid comes
// back at once), list, reattach to its output, stdin, kill; it outlives the HTTP
// clients that started and followed it; a BRANCH carries it into children; the cap.
// And the base image's busybox tools: every applet, nohup, timeout, nc, and wget
// (which crashed on -T) against an upstream host in a namespace of this test's own.
import net from "node:net";
import path from "node:path";
import { Controller, ForkdApiError, Sandbox } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";
import { startUpstream, type Upstream } from "../helpers/upstream.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "procs-warm";
const TICKER = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done";

let daemon: DaemonHandle;
let api: Controller;
let upstream: Upstream;
let sandboxId: string;

type Event = { type: string; data?: string; exit_code?: number | null; signal?: string | null; dropped_bytes?: number; error?: unknown };

async function waitUntil<T>(what: () => Promise<T | undefined | false>, ms = 60_000, label = "condition"): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await what();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${label}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * Follow a process's output over raw NDJSON until `until` holds for the stdout seen
 * (then leave, as a client that goes away) or the exit line comes.
 */
async function follow(id: string, pid: number, until: (stdout: string) => boolean = () => false) {
  const leave = new AbortController();
  const res = await fetch(`${daemon.url}/v1/sandboxes/${id}/processes/${pid}/output`, {
    headers: { authorization: `Bearer ${daemon.token}` },
    signal: leave.signal,
  });
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toContain("application/x-ndjson");
  const events: Event[] = [];
  let stdout = "";
  let buffered = "";
  const decoder = new TextDecoder();
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buffered += decoder.decode(chunk, { stream: true });
      for (let nl = buffered.indexOf("\n"); nl >= 0; nl = buffered.indexOf("\n")) {
        const event = JSON.parse(buffered.slice(0, nl)) as Event;
        buffered = buffered.slice(nl + 1);
        events.push(event);
        if (event.type === "stdout") stdout += Buffer.from(event.data ?? "", "base64").toString();
      }
      if (until(stdout)) {
        leave.abort();
        break;
      }
    }
  } catch (err) {
    if (!leave.signal.aborted) throw err;
  }
  return { stdout, events, exit: events.find((e) => e.type === "exit") };
}

async function exec(id: string, cmd: string, timeoutMs = 60_000) {
  return api.exec(id, { cmd, timeout_ms: timeoutMs });
}

async function processOf(id: string, pid: number) {
  return (await api.listProcesses(id)).find((p) => p.pid === pid);
}

const ticks = (stdout: string) => [...stdout.matchAll(/tick (\d+)/g)].map((m) => Number(m[1]));

beforeAll(async () => {
  upstream = await startUpstream({ hostAddr: "198.51.100.5", addr: "198.51.100.6", body: "from-upstream-wget" });
  const { spawnSync } = await import("node:child_process");
  const snap = spawnSync(process.execPath, [CLI, "snapshot", "--tag", TAG], { encoding: "utf8", timeout: 600_000 });
  expect(snap.status, snap.stderr).toBe(0);
  daemon = await startDaemonProcess(env.runDir);
  api = new Controller({ url: daemon.url, token: daemon.token });
  sandboxId = (await api.createSandboxes({ snapshot_tag: TAG, n: 1 }))[0]!.id;
}, 900_000);

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  const { spawnSync } = await import("node:child_process");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { stdio: "ignore" });
  spawnSync(process.execPath, [CLI, "cleanup"], { stdio: "ignore" });
  upstream?.stop();
});

describe("background processes over REST", () => {
  it("starts at once, lists, reattaches to the ticks from the start, and a kill ends it with an exit line", async () => {
    const t0 = performance.now();
    const started = await api.execBackground(sandboxId, { cmd: TICKER, tag: "ticker" });
    // The answer comes when the process has started, not when it ends (it never would).
    expect(performance.now() - t0).toBeLessThan(30_000);
    expect(started).toMatchObject({
      cmd: "/bin/sh",
      args: ["-c", TICKER],
      running: true,
      exit_code: null,
      tag: "ticker",
      stdin_open: true,
    });
    const { pid } = started;
    expect(await processOf(sandboxId, pid)).toMatchObject({ pid, running: true });
    const first = await follow(sandboxId, pid, (out) => ticks(out).length >= 5);
    // The replay starts from its first line; the exit has not come.
    expect(ticks(first.stdout).slice(0, 5)).toEqual([0, 1, 2, 3, 4]);
    expect(first.exit).toBeUndefined();
    // Leaving the stream did not stop it: it keeps ticking.
    const count = (await processOf(sandboxId, pid))!.stdout_bytes;
    await waitUntil(async () => (await processOf(sandboxId, pid))!.stdout_bytes > count + 20, 30_000, "more ticks");
    const kill = await fetch(`${daemon.url}/v1/sandboxes/${sandboxId}/processes/${pid}?signal=SIGTERM`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${daemon.token}` },
    });
    expect(kill.status).toBe(204);
    const after = await follow(sandboxId, pid);
    expect(after.exit).toMatchObject({ type: "exit", exit_code: null, signal: "SIGTERM", truncated: false });
    const n = ticks(after.stdout);
    expect(n.length).toBeGreaterThanOrEqual(8);
    expect(n).toEqual(n.map((_, i) => i));
    expect(await processOf(sandboxId, pid)).toMatchObject({ running: false, signal: "SIGTERM", ended_at: expect.any(String) });
    // A second kill: it is no longer running (409); an unknown pid: 404; a bad signal: 422.
    const again = await api.killProcess(sandboxId, pid).catch((e: unknown) => e);
    expect(again).toMatchObject({ status: 409, code: "invalid_state" });
    expect(await api.killProcess(sandboxId, 4_000_000).catch((e: unknown) => e)).toMatchObject({ status: 404, code: "not_found" });
    const badSignal = await fetch(`${daemon.url}/v1/sandboxes/${sandboxId}/processes/${pid}?signal=SIGSEGV`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${daemon.token}` },
    });
    expect(badSignal.status).toBe(422);
    const noStream = await fetch(`${daemon.url}/v1/sandboxes/${sandboxId}/processes/4000000/output`, {
      headers: { authorization: `Bearer ${daemon.token}` },
    });
    expect(noStream.status).toBe(404);
  });

  it("sends stdin to a cat-like process and reads it back; eof ends it", async () => {
    const { pid } = await api.execBackground(sandboxId, { cmd: 'while read -r line; do echo "got: $line"; done; echo bye' });
    const res = await api.sendProcessStdin(sandboxId, pid, { data: "first\n" });
    expect(res).toEqual({ pid, bytes: 6, stdin_open: true });
    await api.sendProcessStdin(sandboxId, pid, { data: Buffer.from("sécond\n").toString("base64"), encoding: "base64" });
    const seen = await follow(sandboxId, pid, (out) => out.includes("got: sécond"));
    expect(seen.stdout).toBe("got: first\ngot: sécond\n");
    expect(await api.sendProcessStdin(sandboxId, pid, { eof: true })).toEqual({ pid, bytes: 0, stdin_open: false });
    const done = await follow(sandboxId, pid);
    expect(done.stdout).toBe("got: first\ngot: sécond\nbye\n");
    expect(done.exit).toMatchObject({ exit_code: 0, signal: null });
    const closed = await api.sendProcessStdin(sandboxId, pid, { data: "late\n" }).catch((e: unknown) => e);
    expect(closed).toMatchObject({ status: 409, code: "invalid_state" });
    const empty = await api.sendProcessStdin(sandboxId, pid, {}).catch((e: unknown) => e);
    expect(empty).toMatchObject({ status: 400 });
  });

  it("outlives the HTTP clients that started and followed it", async () => {
    // Start it over a raw connection that is cut as soon as the request is sent.
    const body = JSON.stringify({ cmd: TICKER, background: true, tag: "orphan" });
    const { port } = new URL(daemon.url);
    await new Promise<void>((resolve, reject) => {
      const socket = net.createConnection({ host: "127.0.0.1", port: Number(port) }, () => {
        socket.end(
          `POST /v1/sandboxes/${sandboxId}/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${daemon.token}\r\n` +
            `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
          () => {
            socket.destroy();
            resolve();
          },
        );
      });
      socket.on("error", reject);
    });
    const orphan = await waitUntil(
      async () => (await api.listProcesses(sandboxId)).find((p) => p.tag === "orphan"),
      30_000,
      "the process started by a client that left",
    );
    expect(orphan.running).toBe(true);
    // Two followers come and go mid-stream; the ticks go on and a third sees them all.
    await follow(sandboxId, orphan.pid, (out) => ticks(out).length >= 2);
    await follow(sandboxId, orphan.pid, (out) => ticks(out).length >= 4);
    const later = await follow(sandboxId, orphan.pid, (out) => ticks(out).length >= 10);
    expect(ticks(later.stdout).slice(0, 10)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(await processOf(sandboxId, orphan.pid)).toMatchObject({ running: true });
    await api.killProcess(sandboxId, orphan.pid);
  });

  it("enforces the cap of 64 running processes with a clear error, and a killed one frees a place", async () => {
    const [capId] = (await api.createSandboxes({ snapshot_tag: TAG, n: 1 })).map((s) => s.id);
    const pids: number[] = [];
    for (let i = 0; i < 64; i++) pids.push((await api.execBackground(capId!, { args: ["sleep", "600"] })).pid);
    expect(new Set(pids).size).toBe(64);
    const refused = await api.execBackground(capId!, { args: ["sleep", "600"] }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ForkdApiError);
    expect(refused).toMatchObject({ status: 503, code: "over_limit", details: { limit: 64 } });
    expect((refused as Error).message).toMatch(/64 background processes already run in this sandbox/);
    expect((await api.listProcesses(capId!)).filter((p) => p.running)).toHaveLength(64);
    await api.killProcess(capId!, pids[0]!);
    await waitUntil(async () => !(await processOf(capId!, pids[0]!))?.running, 30_000, "the killed one to exit");
    expect((await api.execBackground(capId!, { args: ["sleep", "600"] })).running).toBe(true);
    await api.deleteSandbox(capId!);
  });
});

describe("BRANCH carries background processes", () => {
  it("a child forked from a BRANCH lists the process running in its parent at BRANCH time and follows its output on", async () => {
    const [sourceId] = (await api.createSandboxes({ snapshot_tag: TAG, n: 1 })).map((s) => s.id);
    const { pid } = await api.execBackground(sourceId!, { cmd: TICKER, tag: "carried" });
    await follow(sourceId!, pid, (out) => ticks(out).length >= 3);
    // A follower is attached while the BRANCH is taken: the child must not inherit it as output for its own host.
    const leave = new AbortController();
    const following = fetch(`${daemon.url}/v1/sandboxes/${sourceId}/processes/${pid}/output`, {
      headers: { authorization: `Bearer ${daemon.token}` },
      signal: leave.signal,
    }).then(async (res) => {
      for await (const _ of res.body as unknown as AsyncIterable<Uint8Array>) {
        // read until we leave
      }
    });
    following.catch(() => {});
    await new Promise((r) => setTimeout(r, 500));
    const branched = await api.branchSandbox(sourceId!, { tag: "procs-branch" });
    const atBranch = (await processOf(sourceId!, pid))!.stdout_bytes;
    const [childId] = (await api.createSandboxes({ snapshot_tag: branched.tag, n: 1 })).map((s) => s.id);
    const inChild = await processOf(childId!, pid);
    expect(inChild).toMatchObject({ pid, tag: "carried", running: true, cmd: "/bin/sh", args: ["-c", TICKER] });
    // Its output so far came with it, and it goes on in the child, past the BRANCH.
    const seen = await follow(childId!, pid, (out) => out.length > atBranch + 40);
    const n = ticks(seen.stdout);
    expect(n.slice(0, 3)).toEqual([0, 1, 2]);
    expect(n).toEqual(n.map((_, i) => i));
    expect(seen.stdout.length).toBeGreaterThan(atBranch + 40);
    // The child answers as healthy (nothing of the parent's follower reached its host), and its copy is its own.
    expect((await api.getSandbox(childId!)).health).toBe("healthy");
    await api.killProcess(childId!, pid);
    await waitUntil(async () => !(await processOf(childId!, pid))?.running, 30_000, "the child's copy to exit");
    expect(await processOf(sourceId!, pid)).toMatchObject({ running: true });
    leave.abort();
    await api.deleteSandbox(childId!);
    await api.deleteSandbox(sourceId!);
  });
});

describe("the SDK's commands", () => {
  it("run in the background, list, connect, sendStdin, closeStdin, disconnect and kill, as E2B's", async () => {
    const sandbox = await Sandbox.connect(sandboxId, { controller: api });
    const chunks: string[] = [];
    const ticker = await sandbox.commands.run(TICKER, { background: true, onStdout: (d) => chunks.push(d) });
    expect(ticker.pid).toBeGreaterThan(1);
    await waitUntil(async () => ticks(chunks.join("")).length >= 3, 30_000, "ticks through onStdout");
    const listed = await sandbox.commands.list();
    expect(listed.find((p) => p.pid === ticker.pid)).toMatchObject({ cmd: "/bin/sh", args: ["-c", TICKER], running: true });
    await ticker.disconnect();
    const again = await sandbox.commands.connect(ticker.pid);
    await waitUntil(async () => ticks(again.stdout).length >= 5, 30_000, "ticks after connect");
    expect(ticks(again.stdout).slice(0, 5)).toEqual([0, 1, 2, 3, 4]);
    expect(await sandbox.commands.kill(ticker.pid)).toBe(true);
    await expect(again.wait()).rejects.toMatchObject({ name: "CommandExitError", exitCode: 137 });
    expect(again.exitCode).toBe(137);
    expect(await sandbox.commands.kill(ticker.pid)).toBe(false);
    await expect(sandbox.commands.connect(4_000_000)).rejects.toMatchObject({ code: "not_found" });

    const cat = await sandbox.commands.run("cat", { background: true });
    await sandbox.commands.sendStdin(cat.pid, "echo me\n");
    await sandbox.commands.sendStdin(cat.pid, new Uint8Array(Buffer.from("bytes too\n")));
    await sandbox.commands.closeStdin(cat.pid);
    expect(await cat.wait()).toEqual({ exitCode: 0, stdout: "echo me\nbytes too\n", stderr: "" });
  });
});

describe("the base image's busybox", () => {
  it("links every applet busybox has on PATH, and wget is the wrapper, not the crashing applet", async () => {
    // busybox's sh runs its applets ahead of PATH, so `command -v` would prove nothing: look for the
    // files where busybox says each belongs. The wget applet is renamed in the image (wgeT) and
    // wrapped; the wrapper is the `wget` on PATH.
    const res = await exec(
      sandboxId,
      'n=0; for p in $(/opt/forkd/bin/busybox --list-full); do n=$((n+1)); [ "$p" = usr/bin/wgeT ] && continue; ' +
        '[ -e "/$p" ] || echo "missing /$p"; done; echo "applets $n"; command -v wget; command -v nohup',
    );
    expect(res.stdout).not.toContain("missing");
    expect(Number(/applets (\d+)/.exec(res.stdout)?.[1])).toBeGreaterThan(200);
    expect(res.stdout).toContain("\n/usr/bin/wget\n/usr/bin/nohup\n");
  });

  it("has nohup (SIGHUP ignored), timeout and nc", async () => {
    const hup = await exec(sandboxId, "nohup sh -c 'echo before; kill -HUP $$; echo after-hup'");
    expect(hup).toMatchObject({ exit_code: 0, stdout: "before\nafter-hup\n" });
    const usage = await exec(sandboxId, "nohup");
    expect(usage.exit_code).toBe(125);
    const t0 = performance.now();
    const timeout = await exec(sandboxId, "timeout 1 sleep 30; echo status $?");
    expect(timeout.stdout).toBe("status 143\n");
    expect(performance.now() - t0).toBeLessThan(20_000);
    const nc = await exec(
      sandboxId,
      "nc -l -p 7070 > /tmp/nc.out & sleep 0.5; echo hello-nc | nc -w 5 127.0.0.1 7070; sleep 0.5; cat /tmp/nc.out; " +
        `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 ${upstream.addr} ${upstream.port}`,
    );
    expect(nc.stdout).toContain("hello-nc");
    expect(nc.stdout).toContain("from-upstream-wget");
  });

  it("runs wget, -T included (busybox's own crashed on it), against an upstream on this machine", async () => {
    const url = `http://${upstream.addr}:${upstream.port}/`;
    const plain = await exec(sandboxId, `wget -q -O - ${url}`);
    expect(plain).toMatchObject({ exit_code: 0, stdout: "from-upstream-wget" });
    for (const form of ["-T 5", "-T5", "-qT 5", "--timeout=5", "--timeout 5"]) {
      const res = await exec(sandboxId, `wget ${form} -q -O - ${url}; echo " status $?"`);
      expect(res.stdout, form).toBe("from-upstream-wget status 0\n");
    }
    // A destination the egress policy drops: -T bounds the wait, and nothing segfaults (139).
    const t0 = performance.now();
    const blocked = await exec(sandboxId, "wget -T 2 -q -O /dev/null http://10.213.99.2:8080/; echo status $?");
    const status = Number(/status (\d+)/.exec(blocked.stdout)?.[1]);
    expect([1, 4]).toContain(status);
    expect(performance.now() - t0).toBeLessThan(30_000);
    // Names come from /etc/hosts first (nsswitch.conf): localhost is found with no DNS at
    // all. Checked in a sandbox without network, so a lookup that went out could not leave.
    const [offline] = (await api.createSandboxes({ snapshot_tag: TAG, n: 1, network: false })).map((s) => s.id);
    const t1 = performance.now();
    const local = await exec(
      offline!,
      "mkdir -p /tmp/www && echo local-page > /tmp/www/index.html && (httpd -f -p 127.0.0.1:8081 -h /tmp/www & echo $! > /tmp/httpd.pid); sleep 0.5; " +
        "wget -T 5 -q -O - http://localhost:8081/; kill $(cat /tmp/httpd.pid)",
    );
    expect(local.stdout).toBe("local-page\n");
    expect(performance.now() - t1).toBeLessThan(15_000);
    await api.deleteSandbox(offline!);
  });

  it("keeps `nohup sh -c '...' &` started through exec running after the exec returns", async () => {
    const t0 = performance.now();
    const start = await exec(
      sandboxId,
      "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/hup.count; echo tick $i; sleep 0.2; done' & echo $! > /tmp/hup.pid; echo started",
      30_000,
    );
    expect(start).toMatchObject({ exit_code: 0, timed_out: false });
    expect(start.stdout).toContain("started");
    expect(performance.now() - t0).toBeLessThan(25_000);
    const first = Number((await exec(sandboxId, "cat /tmp/hup.count")).stdout);
    await new Promise((r) => setTimeout(r, 1500));
    const second = Number((await exec(sandboxId, "cat /tmp/hup.count")).stdout);
    expect(second).toBeGreaterThan(first);
    const alive = await exec(sandboxId, "kill -0 $(cat /tmp/hup.pid) && echo alive; kill $(cat /tmp/hup.pid)");
    expect(alive.stdout).toBe("alive\n");
  });
});
