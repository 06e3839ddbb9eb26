// Admission control and the daemon's guards, against a real daemon process and
// real VMs. The staging filesystem is a 512 MiB tmpfs of its own, so "shmem is
// short" is a real condition here, not a pretend one.
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
const shmMount = path.join(env.runDir, "shm-mount");
process.env.FORKD_SHM_DIR = path.join(shmMount, "forkd");
const TAG = "admit-warm";
let daemon: DaemonHandle;

type Res = { status: number; body: Record<string, unknown>; headers: Headers; text: string };
async function call(method: string, route: string, body?: unknown): Promise<Res> {
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${daemon.token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  let parsed: unknown = {};
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, body: parsed as Record<string, unknown>, headers: res.headers, text };
}

function auditLines(): Record<string, unknown>[] {
  return fs
    .readFileSync(daemon.audit, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** The first audit line past `after` lines for a path ending in `pathEnd` (written once the response has gone out). */
async function auditLineFor(after: number, pathEnd: string): Promise<Record<string, unknown>> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const line = auditLines()
      .slice(after)
      .find((l) => String(l.path).endsWith(pathEnd));
    if (line || Date.now() > deadline) return line ?? {};
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  fs.mkdirSync(shmMount, { recursive: true });
  const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", shmMount], { encoding: "utf8" });
  if (mounted.status !== 0) throw new Error(`cannot mount a tmpfs for the staging dir: ${mounted.stderr}`);
  daemon = await startDaemonProcess(env.runDir, ["--max-sandboxes", "2"]);
  const res = await call("POST", "/v1/snapshots", { tag: TAG, memory_mib: 128 });
  expect(res.status, res.text).toBe(201);
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  for (const pid of qemuPidsUnder(env.runDir)) process.kill(pid, "SIGKILL");
  await new Promise((r) => setTimeout(r, 500));
  spawnSync("umount", ["-l", shmMount]);
});

describe("admission", () => {
  it("refuses a snapshot whose RAM cannot fit on the staging filesystem: 503, Retry-After, resource shm, nothing left", async () => {
    const before = fs.readdirSync(path.join(process.env.FORKD_SHM_DIR!, "images"));
    const res = await call("POST", "/v1/snapshots", { tag: "too-big-for-shm", memory_mib: 1024 });
    expect(res.status, res.text).toBe(503);
    expect(res.body).toMatchObject({ code: "over_limit", details: { resource: "shm", retry_after_s: 10 } });
    expect(res.body.error).toMatch(/staging filesystem/);
    expect(res.headers.get("retry-after")).toBe("10");
    expect(fs.readdirSync(path.join(process.env.FORKD_SHM_DIR!, "images"))).toEqual(before);
    expect((await call("GET", "/v1/snapshots/too-big-for-shm")).status).toBe(404);
  });

  it("bounds a parent's RAM by host memory: 64 GiB is refused with resource memory before anything boots", async () => {
    const qemus = qemuPidsUnder(env.runDir).length;
    const res = await call("POST", "/v1/snapshots", { tag: "too-big-for-ram", memory_mib: 65536 });
    expect(res.status, res.text).toBe(503);
    expect(res.body).toMatchObject({ code: "over_limit", details: { resource: "memory" } });
    expect(res.headers.get("retry-after")).toBe("10");
    expect(qemuPidsUnder(env.runDir).length).toBe(qemus);
    // Beyond what any VM may have, it is a bad request, not a full host.
    expect((await call("POST", "/v1/snapshots", { tag: "way-too-big", memory_mib: 65537 })).status).toBe(400);
  });

  it("reserves the sandbox limit atomically: of three concurrent forks under --max-sandboxes 2, one is refused", async () => {
    const answers = await Promise.all([0, 1, 2].map(() => call("POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1 })));
    const statuses = answers.map((a) => a.status).sort();
    expect(statuses, answers.map((a) => a.text).join("\n")).toEqual([201, 201, 503]);
    const refused = answers.find((a) => a.status === 503)!;
    expect(refused.body).toMatchObject({ code: "over_limit", details: { resource: "sandboxes", retry_after_s: 5 } });
    expect(refused.headers.get("retry-after")).toBe("5");
    expect(refused.body.error).toMatch(/being started|sandboxes run/);
    const live = (await call("GET", "/v1/sandboxes")).body as unknown as { id: string }[];
    expect(live).toHaveLength(2);
  });

  it("counts a BRANCH in flight: a second one that would not fit beside it on shmem is refused, then fits once it is done", async () => {
    const [a, b] = ((await call("GET", "/v1/sandboxes")).body as unknown as { id: string }[]).map((s) => s.id) as [string, string];
    // 128 MiB staged, so 384 MiB free: one BRANCH (stream + image ≈ 320 MiB) fits, two do not.
    const first = await call("POST", `/v1/sandboxes/${a}/branch`, { tag: "admit-b1", wait: false });
    expect(first.status, first.text).toBe(202);
    const second = await call("POST", `/v1/sandboxes/${b}/branch`, { tag: "admit-b2", wait: false });
    expect(second.status, second.text).toBe(503);
    expect(second.body).toMatchObject({ code: "over_limit", details: { resource: "shm" } });
    const deadline = Date.now() + 180_000;
    let status = "writing";
    while (status === "writing" && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      status = String((await call("GET", "/v1/snapshots/admit-b1/status")).body.status);
    }
    expect(status).toBe("ready");
    // admit-b1's new image is idle on shmem: evicted (least recently used, no child) to make room.
    const third = await call("POST", `/v1/sandboxes/${b}/branch`, { tag: "admit-b2" });
    expect(third.status, third.text).toBe(201);
    // And the two BRANCH sources still count against --max-sandboxes.
    const fork = await call("POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1 });
    expect(fork.status).toBe(503);
    expect(fork.body).toMatchObject({ details: { resource: "sandboxes" } });
  });
});

describe("bounded timeouts", () => {
  it("answers 400 beyond each timeout's documented maximum", async () => {
    const [id] = ((await call("GET", "/v1/sandboxes")).body as unknown as { id: string }[]).map((s) => s.id);
    for (const [route, body, field] of [
      [`/v1/sandboxes/${id}/eval`, { code: "1", timeout_ms: 2 ** 31 + 1 }, "timeout_ms"],
      [`/v1/sandboxes/${id}/eval`, { code: "1", timeout_ms: 0 }, "timeout_ms"],
      [`/v1/sandboxes/${id}/exec`, { argv: ["true"], timeout_ms: 3_600_001 }, "timeout_ms"],
      [`/v1/sandboxes/${id}/exec`, { argv: ["true"], timeout_secs: 1e300 }, "timeout_secs"],
      [`/v1/sandboxes/${id}/exec/stream`, { argv: ["true"], timeout_ms: 1.5 }, "timeout_ms"],
      ["/v1/sandboxes", { snapshot_tag: TAG, timeout_ms: 31 * 24 * 3_600_000 }, "timeout_ms"],
      ["/v1/snapshots", { tag: "bw", boot_wait_secs: 61 }, "boot_wait_secs"],
    ] as const) {
      const res = await call("POST", route, body);
      expect(res.status, `${route} ${JSON.stringify(body)}: ${res.text}`).toBe(400);
      expect(res.body.error).toMatch(new RegExp(`${field} must be a whole number`));
    }
    expect((await call("POST", `/v1/sandboxes/${id}/eval`, { code: "6 * 7", timeout_ms: 3_600_000 })).body).toMatchObject({ value: 42 });
    const doc = (await call("GET", "/v1/openapi.json")).text;
    expect(doc).toContain("from 1 to 3600000; beyond: 400");
  });
});

describe("bad input gets a 4xx", () => {
  it("refuses NUL bytes in a command, answers a guest's own refusal with 422 and an eval past its timeout with its outcome", async () => {
    const [id] = ((await call("GET", "/v1/sandboxes")).body as unknown as { id: string }[]).map((s) => s.id);
    for (const body of [
      { argv: ["tr\u0000ue"] },
      { cmd: "true\u0000" },
      { argv: ["true"], env: { A: "x\u0000" } },
      { cmd: "true", cwd: "/\u0000" },
    ]) {
      const res = await call("POST", `/v1/sandboxes/${id}/exec`, body);
      expect(res.status, res.text).toBe(400);
      expect(res.body.error).toMatch(/must not contain NUL bytes/);
    }
    // The guest's filesystem refuses (EIO, EBUSY): the agent answered as it should, so no 502.
    const unreadable = await call("POST", `/v1/sandboxes/${id}/files`, { action: "read", path: "/proc/self/mem" });
    expect(unreadable.status, unreadable.text).toBe(422);
    expect(unreadable.body.code).toBe("guest_error");
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { action: "write", path: "/", data: "x" })).status).toBe(422);
    const slow = await call("POST", `/v1/sandboxes/${id}/eval`, { code: "for (;;) {}", timeout_ms: 50 });
    expect(slow.status, slow.text).toBe(200);
    expect(slow.body).toMatchObject({ result: null, exit_code: 1, timed_out: true });
    expect(slow.body.error).toMatch(/longer than 50 ms/);
    expect((await call("POST", `/v1/sandboxes/${id}/eval`, { code: "6 * 7" })).body).toMatchObject({ value: 42 });
  });
});

describe("the audit log", () => {
  it("records the command, the eval digest and file paths, never contents, stdin or env values", async () => {
    const [id] = ((await call("GET", "/v1/sandboxes")).body as unknown as { id: string }[]).map((s) => s.id);
    const secret = "s3cret-value-that-must-not-be-logged";
    let before = auditLines().length;
    expect((await call("POST", `/v1/sandboxes/${id}/exec`, { argv: ["cat"], stdin: secret, env: { API_KEY: secret } })).status).toBe(200);
    expect((await auditLineFor(before, `${id}/exec`)).exec).toEqual({ argv: ["cat"] });
    before = auditLines().length;
    await call("POST", `/v1/sandboxes/${id}/exec`, { cmd: "echo hi | wc -c" });
    expect((await auditLineFor(before, `${id}/exec`)).exec).toEqual({ cmd: "echo hi | wc -c" });
    const code = `globalThis.k = "${secret}"; 1`;
    before = auditLines().length;
    expect((await call("POST", `/v1/sandboxes/${id}/eval`, { code })).status).toBe(200);
    expect((await auditLineFor(before, `${id}/eval`)).eval).toMatchObject({ sha256: createHash("sha256").update(code).digest("hex") });
    before = auditLines().length;
    expect((await call("POST", `/v1/sandboxes/${id}/files`, { action: "write", path: "/root/.env", data: secret })).status).toBe(200);
    expect((await auditLineFor(before, `${id}/files`)).file).toEqual({ action: "write", path: "/root/.env" });
    expect(fs.readFileSync(daemon.audit, "utf8")).not.toContain(secret);
  });
});

describe("start-up rules", () => {
  const dir = path.join(env.runDir, "startup");
  // A home of their own: a second daemon on the test's home would try to re-adopt its sandboxes.
  const ownEnv = { ...process.env, FORKD_HOME: path.join(dir, "home"), FORKD_RUN_DIR: path.join(dir, "run") };
  const run = (args: string[]) =>
    spawnSync(process.execPath, [CLI, "daemon", "--socket", path.join(dir, "s.sock"), ...args], {
      env: ownEnv,
      encoding: "utf8",
      timeout: 60_000,
    });

  it("refuses a token file group or others can read, naming the fix", () => {
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, "token");
    fs.writeFileSync(file, "Zq3v9Lr1Kx8Wm2Tn5Pb7Yc4Hd6\n", { mode: 0o644 });
    fs.chmodSync(file, 0o644);
    const res = run(["--token-file", file, "--listen", "127.0.0.1:0"]);
    expect(res.status).not.toBe(0);
    expect(res.stderr).toContain(`chmod 600 ${file}`);
  });

  it("refuses plain HTTP off loopback, and serves it with --insecure-listen", async () => {
    const file = path.join(dir, "token-ok");
    fs.writeFileSync(file, "Zq3v9Lr1Kx8Wm2Tn5Pb7Yc4Hd6\n", { mode: 0o600 });
    const refused = run(["--token-file", file, "--listen", "0.0.0.0:0"]);
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toMatch(/refusing to serve plain HTTP on 0\.0\.0\.0.*--insecure-listen/);
    const child = spawn(
      process.execPath,
      [CLI, "daemon", "--socket", path.join(dir, "i.sock"), "--token-file", file, "--listen", "0.0.0.0:0", "--insecure-listen"],
      { env: ownEnv, stdio: ["ignore", "ignore", "pipe"] },
    );
    let stderr = "";
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const deadline = Date.now() + 60_000;
    while (!/http:\/\/0\.0\.0\.0:\d+/.test(stderr) && child.exitCode === null && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await exited;
    expect(stderr).toMatch(/http:\/\/0\.0\.0\.0:\d+/);
  });
});
