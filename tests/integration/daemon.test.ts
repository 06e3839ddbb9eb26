// The daemon as its own process, over real sockets, with real VMs: every route,
// auth, bad input, the audit log, metrics, OpenAPI, and a restart that re-adopts.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import SwaggerParser from "@apidevtools/swagger-parser";
import { Controller, ForkdApiError } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "api-warm";
let daemon: DaemonHandle;

type Res = { status: number; body: unknown; text: string; headers: Headers };
async function call(
  method: string,
  route: string,
  opts: { body?: unknown; raw?: string; token?: string | null; contentType?: string } = {},
): Promise<Res> {
  const headers: Record<string, string> = {};
  const token = opts.token === undefined ? daemon.token : opts.token;
  if (token !== null) headers.authorization = `Bearer ${token}`;
  if (opts.body !== undefined || opts.raw !== undefined) headers["content-type"] = opts.contentType ?? "application/json";
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers,
    body: opts.raw ?? (opts.body !== undefined ? JSON.stringify(opts.body) : undefined),
  });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, body, text, headers: res.headers };
}

/**
 * Stream a body of `bytes` bytes over a raw socket. The daemon answers 413 and
 * closes as soon as it knows the body is too large, possibly while we are still
 * writing, so writes may fail: what counts is the answer read back.
 */
function postHuge(route: string, bytes: number): Promise<{ status: number; body: string }> {
  const { port } = new URL(daemon.url);
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ host: "127.0.0.1", port: Number(port) });
    let received = "";
    const finish = () => {
      const m = /^HTTP\/1\.1 (\d+)/.exec(received);
      if (m) resolve({ status: Number(m[1]), body: received.slice(received.indexOf("\r\n\r\n") + 4) });
      else reject(new Error(`no HTTP answer: ${received.slice(0, 200)}`));
    };
    socket.setEncoding("utf8").on("data", (d: string) => {
      received += d;
      const headEnd = received.indexOf("\r\n\r\n");
      const length = Number(/content-length: (\d+)/i.exec(received)?.[1] ?? Number.NaN);
      if (headEnd >= 0 && received.length - headEnd - 4 >= length) socket.destroy();
    });
    socket.on("error", () => {});
    socket.on("close", finish);
    socket.on("connect", () => {
      socket.write(
        `POST ${route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${daemon.token}\r\nContent-Type: application/json\r\nContent-Length: ${bytes}\r\n\r\n`,
      );
      const chunk = Buffer.alloc(1 << 20, 0x61);
      let sent = 0;
      // The daemon judges the declared length and answers before reading on; keep
      // sending only while no answer has come, so its close cannot reset our read side.
      const pump = () => {
        if (received || socket.destroyed || sent >= bytes) return;
        sent += chunk.length;
        socket.write(chunk, () => setTimeout(pump, 5));
      };
      setTimeout(pump, 200);
    });
  });
}

function errorCode(res: Res): string | undefined {
  return (res.body as { code?: string }).code;
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
});

describe("start-up rules", () => {
  it("listens on a 0600 unix socket", () => {
    expect(fs.statSync(daemon.socket).mode & 0o777).toBe(0o600);
  });

  it("refuses placeholder or short tokens and a non-loopback address without a token", () => {
    const dir = fs.mkdtempSync(path.join(env.runDir, "bad-"));
    const run = (args: string[]) =>
      spawnSync(process.execPath, [CLI, "daemon", "--socket", path.join(dir, "s.sock"), ...args], {
        env: process.env,
        encoding: "utf8",
        timeout: 30_000,
      });
    fs.writeFileSync(path.join(dir, "placeholder"), "changeme-changeme-changeme\n", { mode: 0o600 });
    fs.writeFileSync(path.join(dir, "short"), "abc123\n", { mode: 0o600 });
    expect(run(["--token-file", path.join(dir, "placeholder"), "--listen", "127.0.0.1:0"]).stderr).toMatch(/placeholder/);
    expect(run(["--token-file", path.join(dir, "short"), "--listen", "127.0.0.1:0"]).stderr).toMatch(/shorter than 16 bytes/);
    expect(run(["--listen", "0.0.0.0:0"]).stderr).toMatch(/not loopback\) without --token-file/);
  });
});

describe("auth", () => {
  it("lets /healthz through and nothing else without the token", async () => {
    expect((await call("GET", "/healthz", { token: null })).status).toBe(200);
    for (const token of [null, "wrong-token-of-the-same-length-xxxxxxxxx".slice(0, daemon.token.length), "short", `${daemon.token}x`]) {
      const res = await call("GET", "/version", { token });
      expect(res.status).toBe(401);
      expect(errorCode(res)).toBe("unauthorized");
    }
    expect((await call("GET", "/version")).body).toMatchObject({ api: "v1" });
  });
});

describe("snapshots", () => {
  it("creates a warm snapshot and lists it", async () => {
    const res = await call("POST", "/v1/snapshots", { body: { tag: TAG, warm_eval: ["globalThis.answer = 41"] } });
    expect(res.status, res.text).toBe(201);
    expect(res.body).toMatchObject({
      tag: TAG,
      status: "ready",
      parent: null,
      dir: expect.any(String),
      created_at_unix: expect.any(Number),
    });
    // forkd's shape: a bare array
    expect(((await call("GET", "/v1/snapshots")).body as { tag: string }[]).map((s) => s.tag)).toContain(TAG);
    expect((await call("GET", `/v1/snapshots/${TAG}`)).status).toBe(200);
  });

  it("answers bad tags, duplicates and unknown tags with the right errors", async () => {
    for (const tag of ["../x", "a/b", "x".repeat(65), ""]) {
      const res = await call("POST", "/v1/snapshots", { body: { tag } });
      expect(res.status, `${tag}: ${res.text}`).toBe(400);
      expect(errorCode(res)).toBe("invalid_tag");
    }
    // forkd answers an existing tag with 400 ("DELETE first")
    const dup = await call("POST", "/v1/snapshots", { body: { tag: TAG } });
    expect(dup.status).toBe(400);
    expect(dup.body).toMatchObject({
      error: expect.stringContaining("already exists"),
      code: "bad_request",
      remediation: expect.any(String),
    });
    expect((await call("GET", "/v1/snapshots/nope")).status).toBe(404);
    expect((await call("GET", "/v1/snapshots/..%2Fx")).status).toBe(400);
  });
});

describe("sandboxes", () => {
  let id: string;

  it("forks children and lists them", async () => {
    const res = await call("POST", "/v1/sandboxes", { body: { snapshot_tag: TAG, n: 2 } });
    expect(res.status, res.text).toBe(201);
    const created = res.body as { id: string; snapshot_tag: string; guest_addr: string; timings: { total_ms: number } }[];
    expect(created).toHaveLength(2);
    expect(created[0]).toMatchObject({ snapshot_tag: TAG, has_branched: false, branch_count: 0, netns: null });
    expect(created[0]!.timings.total_ms).toBeGreaterThan(0);
    id = created[0]!.id;
    const listed = (await call("GET", "/v1/sandboxes")).body as { id: string; state: string }[];
    expect(listed.map((s) => s.id)).toEqual(expect.arrayContaining(created.map((s) => s.id)));
    expect((await call("GET", `/v1/sandboxes/${id}`)).body).toMatchObject({ id, snapshot_tag: TAG, state: "running" });
    expect((await call("POST", `/v1/sandboxes/${id}/ping`)).body).toMatchObject({ hostname: id });
  });

  it("runs exec (argv and shell, env, cwd, stdin) and streams long commands", async () => {
    expect(
      (
        await call("POST", `/v1/sandboxes/${id}/exec`, {
          body: { argv: ["sh", "-c", 'echo "$A" $(pwd); cat'], env: { A: "x" }, cwd: "/tmp", stdin: "in" },
        })
      ).body,
    ).toMatchObject({
      exit_code: 0,
      stdout: "x /tmp\nin",
    });
    expect((await call("POST", `/v1/sandboxes/${id}/exec`, { body: { cmd: "exit 4" } })).body).toMatchObject({ exit_code: 4 });
    const stream = await call("POST", `/v1/sandboxes/${id}/exec/stream`, { body: { cmd: "echo a; sleep 0.3; echo b >&2" } });
    expect(stream.headers.get("content-type")).toContain("application/x-ndjson");
    const events = stream.text
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(events.map((e) => e.type)).toEqual(["stdout", "stderr", "exit"]);
    expect(Buffer.from(events[0].data, "base64").toString()).toBe("a\n");
  });

  it("evaluates in the warm context and moves files", async () => {
    expect((await call("POST", `/v1/sandboxes/${id}/eval`, { body: { code: "answer + 1" } })).body).toMatchObject({
      result: "42",
      error: null,
      exit_code: 0,
      value: 42,
      language: "javascript",
    });
    // As forkd: the code's own exception is an answer with exit_code 1, not a failed call.
    const thrown = await call("POST", `/v1/sandboxes/${id}/eval`, { body: { code: "throw new Error('boom')" } });
    expect(thrown.status).toBe(200);
    expect(thrown.body).toMatchObject({ result: null, exit_code: 1, error: expect.stringMatching(/boom/) });
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { body: { action: "write", path: "/root/f.txt", data: "hi" } })).status).toBe(
      200,
    );
    const read = (await call("POST", `/v1/sandboxes/${id}/files`, { body: { action: "read", path: "/root/f.txt" } })).body as {
      data: string;
    };
    expect(Buffer.from(read.data, "base64").toString()).toBe("hi");
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { body: { action: "list", path: "/root" } })).text).toContain("f.txt");
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { body: { action: "remove", path: "/root/f.txt" } })).status).toBe(200);
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { body: { action: "read", path: "/root/f.txt" } })).status).toBe(404);
  });

  it("answers every bad input with the right 4xx JSON and stays healthy", async () => {
    const fork = (body: unknown) => call("POST", "/v1/sandboxes", { body });
    for (const n of [0, -1, 1001]) expect((await fork({ snapshot_tag: TAG, n })).status).toBe(400);
    expect((await fork({ snapshot_tag: TAG, n: "5" })).status).toBe(422);
    expect((await fork({ snapshot_tag: TAG, extra: true })).status).toBe(422);
    expect((await fork({ snapshot_tag: "missing" })).status).toBe(404);
    expect((await fork({ snapshot_tag: "../x" })).status).toBe(400);
    expect((await call("POST", "/v1/sandboxes", { raw: "{nope" })).status).toBe(400);
    expect((await call("POST", "/v1/sandboxes", { raw: "x", contentType: "text/plain" })).status).toBe(415);
    const big = await postHuge("/v1/sandboxes", 100 * 2 ** 20);
    expect(big.status).toBe(413);
    expect(JSON.parse(big.body).code).toBe("too_large");
    expect((await call("POST", `/v1/sandboxes/${id}/exec`, { body: { argv: ["true"], timeout_ms: 10 ** 9 } })).status).toBe(400);
    expect((await call("POST", `/v1/sandboxes/${id}/exec`, { body: { argv: ["true"], cmd: "true" } })).status).toBe(400);
    expect((await call("POST", `/v1/sandboxes/${id}/exec`, { body: { argv: "true" } })).status).toBe(422);
    expect((await call("GET", "/v1/sandboxes/sb-000000000000")).status).toBe(404);
    expect((await call("GET", "/v1/sandboxes/not-an-id")).status).toBe(400);
    expect((await call("GET", "/v1/nothing-here")).status).toBe(404);
    for (const res of [await fork({ snapshot_tag: TAG, n: 0 }), await call("GET", "/v1/nothing-here")]) {
      expect(res.body).toMatchObject({ error: expect.any(String), code: expect.any(String), remediation: expect.any(String) });
    }
    expect((await call("GET", "/healthz")).status).toBe(200);
  });

  it("serves Prometheus metrics and a valid OpenAPI document", async () => {
    const metrics = (await call("GET", "/metrics")).text;
    for (const name of [
      "forkd_sandboxes_active",
      "forkd_snapshots_total",
      "forkd_branches_in_flight",
      "forkd_spawn_seconds_bucket",
      "forkd_call_seconds_bucket",
      "forkd_build_info",
    ]) {
      expect(metrics).toContain(name);
    }
    const doc = (await call("GET", "/v1/openapi.json")).body as { paths: Record<string, unknown> };
    await SwaggerParser.validate(structuredClone(doc) as never);
    expect(Object.keys(doc.paths)).toEqual(
      expect.arrayContaining(["/v1/snapshots", "/v1/sandboxes", "/v1/sandboxes/{id}/exec", "/v1/sandboxes/{id}/files"]),
    );
  });

  it("kills a sandbox with DELETE", async () => {
    expect((await call("DELETE", `/v1/sandboxes/${id}`)).status).toBe(204);
    expect((await call("GET", `/v1/sandboxes/${id}`)).status).toBe(404);
  });

  it("kills a sandbox when its time limit passes", async () => {
    const res = await call("POST", "/v1/sandboxes", { body: { snapshot_tag: TAG, timeout_ms: 1500, metadata: { owner: "test" } } });
    const ttlId = (res.body as { id: string }[])[0]!.id;
    expect((await call("GET", `/v1/sandboxes/${ttlId}`)).body).toMatchObject({
      metadata: { owner: "test" },
      expires_at: expect.any(String),
    });
    const deadline = Date.now() + 15_000;
    while ((await call("GET", `/v1/sandboxes/${ttlId}`)).status === 200 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 250));
    expect((await call("GET", `/v1/sandboxes/${ttlId}`)).status).toBe(404);
  });
});

describe("audit log", () => {
  it("records each request with the fields an operator needs, and never the token", () => {
    const lines = fs
      .readFileSync(daemon.audit, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(lines.length).toBeGreaterThan(20);
    const fork = lines.find((l) => l.method === "POST" && l.path === "/v1/sandboxes" && l.status === 201);
    expect(fork).toMatchObject({ ts: expect.any(String), latency_ms: expect.any(Number), remote: "127.0.0.1", snapshots: [TAG] });
    expect(fork.sandboxes.length).toBeGreaterThan(0);
    expect(lines.some((l) => l.status === 401)).toBe(true);
    expect(fs.readFileSync(daemon.audit, "utf8")).not.toContain(daemon.token);
  });

  it("is reopened on SIGHUP so it can be rotated", async () => {
    fs.renameSync(daemon.audit, `${daemon.audit}.1`);
    daemon.child.kill("SIGHUP");
    await new Promise((r) => setTimeout(r, 200));
    await call("GET", "/version");
    // The audit line is written once the response has gone out: give it a moment.
    const deadline = Date.now() + 3000;
    while (!fs.readFileSync(daemon.audit, "utf8").includes('"/version"') && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
    expect(fs.readFileSync(daemon.audit, "utf8")).toContain('"/version"');
  });
});

describe("restart", () => {
  it("re-adopts live sandboxes after kill -9 and reaps the dead", async () => {
    const res = await call("POST", "/v1/sandboxes", { body: { snapshot_tag: TAG, n: 2 } });
    const [keep, doomed] = (res.body as { id: string }[]).map((s) => s.id) as [string, string];
    await call("POST", `/v1/sandboxes/${keep}/eval`, { body: { code: "globalThis.before = 'restart'" } });
    await stopDaemon(daemon, "SIGKILL");
    const doomedPid = (await import("@forkd/core")).listSandboxes().find((s) => s.id === doomed)!.pid;
    process.kill(doomedPid, "SIGKILL");
    await new Promise((r) => setTimeout(r, 300));
    daemon = await startDaemonProcess(env.runDir);
    const m = /re-adopted (\d+) sandbox\(es\), reaped (\d+)/.exec(daemon.stderr());
    expect(Number(m?.[1])).toBeGreaterThanOrEqual(1);
    expect(Number(m?.[2])).toBe(1);
    expect((await call("POST", `/v1/sandboxes/${keep}/eval`, { body: { code: "before" } })).body).toMatchObject({ value: "restart" });
    expect((await call("GET", `/v1/sandboxes/${doomed}`)).status).toBe(404);
  });

  it("stops cleanly on SIGTERM, leaving sandboxes running and the socket gone", async () => {
    const before = qemuPidsUnder(env.runDir).length;
    expect(await stopDaemon(daemon, "SIGTERM")).toBe(0);
    expect(fs.existsSync(daemon.socket)).toBe(false);
    expect(qemuPidsUnder(env.runDir).length).toBe(before);
    daemon = await startDaemonProcess(env.runDir);
  });
});

describe("CLI through the daemon", () => {
  it("finds the daemon on its socket and runs the same commands through it", () => {
    const cli = (args: string[], input?: string) =>
      spawnSync(process.execPath, [CLI, ...args], {
        env: { ...process.env, FORKD_TOKEN: daemon.token },
        encoding: "utf8",
        timeout: 120_000,
        input,
      });
    const forked = cli(["fork", "--tag", TAG, "-n", "1", "--json"]);
    expect(forked.status, forked.stderr).toBe(0);
    const [child] = JSON.parse(forked.stdout) as { id: string; ok: boolean }[];
    expect(child?.ok).toBe(true);
    // The daemon holds the child's agent connection: only a CLI that goes through it can reach the child.
    expect(cli(["exec", child!.id, "--", "hostname"]).stdout).toBe(`${child!.id}\n`);
    expect(cli(["exec", child!.id, "--", "sh", "-c", "exit 6"]).status).toBe(6);
    expect(cli(["eval", child!.id, "answer"]).stdout).toBe("41\n");
    expect(cli(["files", child!.id, "write", "/root/c.txt"], "via daemon").status).toBe(0);
    expect(cli(["files", child!.id, "read", "/root/c.txt"]).stdout).toBe("via daemon");
    expect(cli(["ls"]).stdout).toContain(child!.id);
    expect(cli(["images"]).stdout).toContain(TAG);
    expect(cli(["kill", child!.id]).stdout).toContain(`killed ${child!.id}`);
    const audit = fs.readFileSync(daemon.audit, "utf8");
    expect(audit).toContain(`/v1/sandboxes/${child!.id}/exec/stream`);
    const wrong = spawnSync(process.execPath, [CLI, "ls"], {
      env: { ...process.env, FORKD_URL: daemon.url, FORKD_TOKEN: "not-the-token-at-all" },
      encoding: "utf8",
    });
    expect(wrong.status).toBe(1);
    expect(wrong.stderr).toMatch(/bearer token/);
  });
});

describe("SDK against the real daemon", () => {
  it("drives every Controller route and maps errors to typed codes", async () => {
    const controller = new Controller({ url: daemon.url, token: daemon.token });
    expect((await controller.health()).ok).toBe(true);
    expect((await controller.version()).api).toBe("v1");
    expect((await controller.listSnapshots()).map((s) => s.tag)).toContain(TAG);
    expect((await controller.getSnapshot(TAG)).tag).toBe(TAG);
    const err = await controller.getSnapshot("missing").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ForkdApiError);
    expect((err as ForkdApiError).code).toBe("snapshot_not_found");
    expect((err as ForkdApiError).status).toBe(404);
    const viaSocket = new Controller({ socketPath: daemon.socket, token: daemon.token });
    expect((await viaSocket.version()).api).toBe("v1");
    await viaSocket.close();
    const bad = new Controller({ url: daemon.url, token: "nope-nope-nope-nope" });
    expect(((await bad.version().catch((e: unknown) => e)) as ForkdApiError).status).toBe(401);
  });

  it("gives E2B-shaped sandboxes: create, commands, files, runCode, connect, fork, kill", async () => {
    const { Sandbox, CommandExitError } = await import("@forkd/sdk");
    const controller = new Controller({ url: daemon.url, token: daemon.token });
    const sandbox = await Sandbox.create({ template: TAG, envs: { GREETING: "hi" }, controller });
    expect(sandbox.sandboxId).toMatch(/^sb-/);
    const chunks: string[] = [];
    const result = await sandbox.commands.run('echo "$GREETING $WHO"', { envs: { WHO: "there" }, onStdout: (d) => chunks.push(d) });
    expect(result).toMatchObject({ exitCode: 0, stdout: "hi there\n" });
    expect(chunks.join("")).toBe("hi there\n");
    const failed = await sandbox.commands.run("echo oops >&2; exit 3").catch((e: unknown) => e);
    expect(failed).toBeInstanceOf(CommandExitError);
    expect(failed).toMatchObject({ exitCode: 3, stderr: "oops\n" });
    const bg = await sandbox.commands.run("sleep 30", { background: true });
    await bg.kill();
    await expect(bg.wait()).rejects.toThrow();
    await sandbox.files.write("/root/sdk.txt", "from the sdk");
    expect(await sandbox.files.read("/root/sdk.txt")).toBe("from the sdk");
    expect(await sandbox.files.exists("/root/sdk.txt")).toBe(true);
    expect((await sandbox.files.list("/root")).map((e) => e.name)).toContain("sdk.txt");
    expect(await sandbox.files.makeDir("/root/d")).toBe(true);
    await sandbox.files.remove("/root/sdk.txt");
    expect(await sandbox.files.exists("/root/sdk.txt")).toBe(false);
    expect((await sandbox.runCode("answer * 2")).value).toBe(82);
    const again = await Sandbox.connect(sandbox.sandboxId, { controller });
    expect((await again.runCode("1 + 1")).value).toBe(2);
    const children = await Sandbox.fork(TAG, 2, { controller });
    expect(new Set(children.map((c) => c.sandboxId)).size).toBe(2);
    for (const s of [sandbox, ...children]) await s.kill();
    expect(await sandbox.isRunning()).toBe(false);
  });
});
