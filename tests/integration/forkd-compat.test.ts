// forkd v0.5.3's documented flows (its docs/API.md), run against our daemon through
// raw HTTP with forkd's exact request bodies, headers and expectations: this client
// is written from forkd's published API description, not from our SDK.
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = fs.mkdtempSync("/dev/shm/forkd-compat-");
const TAG = "compat";
let daemon: DaemonHandle;

type Reply = { status: number; body: unknown; text: string; contentType: string };

/** What forkd's clients send: JSON only with a body, the bearer token always. */
async function forkd(
  method: string,
  route: string,
  body?: unknown,
  opts: { token?: string | null; emptyJson?: boolean } = {},
): Promise<Reply> {
  const headers: Record<string, string> = {};
  const token = opts.token === undefined ? daemon.token : opts.token;
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined || opts.emptyJson) headers["content-type"] = "application/json";
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers,
    ...(body !== undefined ? { body: JSON.stringify(body) } : opts.emptyJson ? { body: "" } : {}),
  });
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = undefined;
  }
  return { status: res.status, body: parsed, text, contentType: res.headers.get("content-type") ?? "" };
}

beforeAll(async () => {
  daemon = await startDaemonProcess(path.dirname(env.home));
  // Our daemon builds parents from images; forkd's kernel/rootfs fields are accepted and not used.
  const created = await forkd("POST", "/v1/snapshots", {
    tag: TAG,
    kernel: "/boot/vmlinux",
    rootfs: "/tmp/rootfs.ext4",
    boot_wait_secs: 10,
  });
  expect(created.status, created.text).toBe(201);
});

afterAll(async () => {
  if (daemon) {
    for (const s of ((await forkd("GET", "/v1/sandboxes")).body as { id: string }[]) ?? []) await forkd("DELETE", `/v1/sandboxes/${s.id}`);
    await stopDaemon(daemon);
  }
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("forkd v0.5.3 documented flows over raw HTTP", () => {
  let id: string;

  it("health, version, and snapshots as a bare array of SnapshotInfo", async () => {
    expect((await forkd("GET", "/healthz", undefined, { token: null })).body).toEqual({ ok: true });
    expect((await forkd("GET", "/version")).body).toMatchObject({ version: expect.any(String), api: "v1" });
    const list = await forkd("GET", "/v1/snapshots");
    expect(list.status).toBe(200);
    expect(Array.isArray(list.body)).toBe(true);
    const snap = (list.body as Record<string, unknown>[]).find((s) => s.tag === TAG);
    expect(snap).toMatchObject({ tag: TAG, dir: expect.any(String), created_at_unix: expect.any(Number), status: "ready" });
  });

  it("spawns with forkd's body (per_child_netns and all) and gets 201 with a bare array of SandboxInfo", async () => {
    const res = await forkd("POST", "/v1/sandboxes", {
      snapshot_tag: TAG,
      n: 2,
      per_child_netns: true,
      memory_limit_mib: 512,
      prewarm: false,
      live_fork: true,
      hugepages: false,
    });
    expect(res.status, res.text).toBe(201);
    const children = res.body as Record<string, unknown>[];
    expect(children).toHaveLength(2);
    for (const c of children) {
      expect(c).toMatchObject({
        id: expect.stringMatching(/^sb-/),
        snapshot_tag: TAG,
        guest_addr: expect.any(String),
        created_at_unix: expect.any(Number),
        pid: expect.any(Number),
        memory_limit_mib: 512,
        has_branched: false,
        last_branch_memory_path: null,
        branch_count: 0,
      });
      expect(c).toHaveProperty("netns");
    }
    id = children[0]!.id as string;
    const listed = (await forkd("GET", "/v1/sandboxes")).body as { id: string }[];
    expect(listed.map((s) => s.id)).toEqual(expect.arrayContaining(children.map((c) => c.id as string)));
    expect((await forkd("GET", `/v1/sandboxes/${id}`)).body).toMatchObject({ id, snapshot_tag: TAG });
  });

  it("pings with no body, and with an empty JSON body as forkd's MCP server and CLI send it", async () => {
    for (const emptyJson of [false, true]) {
      const res = await forkd("POST", `/v1/sandboxes/${id}/ping`, undefined, { emptyJson });
      expect(res.status, res.text).toBe(200);
      expect(res.body).toMatchObject({ pong: true });
    }
  });

  it("execs an argv with timeout_secs: {stdout, stderr, exit_code}", async () => {
    const res = await forkd("POST", `/v1/sandboxes/${id}/exec`, { args: ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_secs: 10 });
    expect(res.status, res.text).toBe(200);
    expect(res.body).toMatchObject({ stdout: "out\n", stderr: "err\n", exit_code: 3 });
    const bad = await forkd("POST", `/v1/sandboxes/${id}/exec`, { args: [], timeout_secs: 5 });
    expect(bad.status).toBe(422);
  });

  it("evals: {result, error, exit_code}, the error as an answer", async () => {
    const ok = await forkd("POST", `/v1/sandboxes/${id}/eval`, { code: "6 * 7" });
    expect(ok.status, ok.text).toBe(200);
    expect(ok.body).toMatchObject({ result: "42", error: null, exit_code: 0 });
    const err = await forkd("POST", `/v1/sandboxes/${id}/eval`, { code: "undefinedName.x" });
    expect(err.status).toBe(200);
    expect(err.body).toMatchObject({ result: null, exit_code: 1, error: expect.stringContaining("undefinedName") });
  });

  it("branches live with wait:false (202 writing), polls GET /v1/snapshots to ready, spawns from the branch", async () => {
    await forkd("POST", `/v1/sandboxes/${id}/exec`, { args: ["sh", "-c", "echo branched > /root/mark"], timeout_secs: 10 });
    const started = await forkd("POST", `/v1/sandboxes/${id}/branch`, { tag: "compat-b", mode: "live", wait: false });
    expect(started.status, started.text).toBe(202);
    expect(started.body).toMatchObject({ tag: "compat-b", status: "writing", branched_from: id });
    const deadline = Date.now() + 120_000;
    let status = "writing";
    while (status !== "ready" && Date.now() < deadline) {
      const entry = ((await forkd("GET", "/v1/snapshots")).body as { tag: string; status: string }[]).find((s) => s.tag === "compat-b");
      status = entry?.status ?? "missing";
      expect(status).not.toBe("failed");
      if (status !== "ready") await new Promise((r) => setTimeout(r, 200));
    }
    expect(status).toBe("ready");
    const child = await forkd("POST", "/v1/sandboxes", { snapshot_tag: "compat-b", n: 1, per_child_netns: false });
    expect(child.status, child.text).toBe(201);
    const childId = (child.body as { id: string }[])[0]!.id;
    expect((await forkd("POST", `/v1/sandboxes/${childId}/exec`, { args: ["cat", "/root/mark"], timeout_secs: 10 })).body).toMatchObject({
      stdout: "branched\n",
      exit_code: 0,
    });
    expect((await forkd("GET", `/v1/sandboxes/${id}`)).body).toMatchObject({ has_branched: true, branch_count: 1 });
    expect((await forkd("DELETE", `/v1/sandboxes/${childId}`)).status).toBe(204);
  });

  it("branches synchronously with the legacy diff flag: 201 SnapshotInfo with pause_ms", async () => {
    const res = await forkd("POST", `/v1/sandboxes/${id}/branch`, { tag: "compat-d", diff: true });
    expect(res.status, res.text).toBe(201);
    expect(res.body).toMatchObject({ tag: "compat-d", status: "ready", branched_from: id, pause_ms: expect.any(Number) });
    const info = await forkd("GET", "/v1/snapshots/compat-d/info");
    expect(info.body).toMatchObject({ tag: "compat-d", parent_tag: TAG, chain_depth: 1, ancestors: [TAG], dependents: [] });
    const compact = await forkd("POST", "/v1/snapshots/compat-d/compact", { to: "compat-flat" });
    expect(compact.status, compact.text).toBe(200);
    expect(compact.body).toMatchObject({ tag: "compat-flat", branched_from: "compact:compat-d", status: "ready" });
  });

  it("deletes snapshots (409 for a base with dependents, cascade removes them) and kills sandboxes with 204", async () => {
    const refused = await forkd("DELETE", `/v1/snapshots/${TAG}`);
    expect(refused.status).toBe(409);
    expect(refused.body).toMatchObject({ error: expect.stringContaining("compat-d"), code: "conflict", remediation: expect.any(String) });
    expect((await forkd("DELETE", "/v1/snapshots/compat-flat")).status).toBe(204);
    expect((await forkd("DELETE", `/v1/sandboxes/${id}`)).status).toBe(204);
    expect((await forkd("GET", `/v1/sandboxes/${id}`)).status).toBe(404);
    expect((await forkd("DELETE", "/v1/snapshots/compat-b?force=true")).status).toBe(204);
    expect((await forkd("DELETE", "/v1/snapshots/compat-d")).status).toBe(204);
  });

  it('errors are forkd\'s {"error": message} with our code and remediation beside it', async () => {
    const missing = await forkd("POST", "/v1/sandboxes", { snapshot_tag: "nope", n: 1 });
    expect(missing.status).toBe(404);
    expect(missing.body).toMatchObject({
      error: expect.stringContaining("nope"),
      code: "snapshot_not_found",
      remediation: expect.any(String),
    });
    const unauth = await forkd("GET", "/v1/sandboxes", undefined, { token: "wrong-token-wrong-token" });
    expect(unauth.status).toBe(401);
    expect(unauth.body).toMatchObject({ error: expect.any(String), code: "unauthorized" });
    const unknownField = await forkd("POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1, bogus_field: 1 });
    expect(unknownField.status).toBe(422);
    expect(unknownField.text).toContain("bogus_field");
  });

  it("the unix socket needs no token: its 0600 permissions are the credential", async () => {
    const { Agent } = await import("undici");
    const res = await fetch("http://forkd/v1/sandboxes", {
      dispatcher: new Agent({ connect: { socketPath: daemon.socket } }),
    } as RequestInit);
    expect(res.status).toBe(200);
    expect(Array.isArray(await res.json())).toBe(true);
    expect(fs.statSync(daemon.socket).mode & 0o777).toBe(0o600);
  });
});
