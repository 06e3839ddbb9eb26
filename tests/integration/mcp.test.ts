// The MCP server as MCP clients run it: `forkd mcp` spawned over stdio by the MCP
// SDK's own Client, against a real daemon and real VMs; then over streamable HTTP
// behind the daemon's bearer token.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import path from "node:path";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import type { CallToolResult, Progress } from "@modelcontextprotocol/sdk/types.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "mcp-warm";
const BRANCH_TAG = "mcp-branch";

let daemon: DaemonHandle;
let client: Client;
let serverStderr = "";

type Json = Record<string, unknown>;

async function call(name: string, args: Json, onprogress?: (p: Progress) => void): Promise<CallToolResult> {
  return (await client.callTool({ name, arguments: args }, undefined, {
    timeout: 300_000,
    ...(onprogress ? { onprogress, resetTimeoutOnProgress: true } : {}),
  })) as CallToolResult;
}

function text(res: CallToolResult): string {
  return res.content.map((c) => (c.type === "text" ? c.text : "")).join("\n");
}

/** The structured answer of a call that must have succeeded (the text is in the failure message). */
async function ok(name: string, args: Json, onprogress?: (p: Progress) => void): Promise<Json> {
  const res = await call(name, args, onprogress);
  expect(res.isError, `${name}: ${text(res)}`).toBeFalsy();
  return res.structuredContent as Json;
}

function mcpEnv(extra: Record<string, string | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, ...extra })) if (v !== undefined) out[k] = v;
  return out;
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
  // What an MCP client config says: command forkd, args [mcp], env FORKD_URL/FORKD_TOKEN.
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [CLI, "mcp"],
    env: mcpEnv({ FORKD_URL: daemon.url, FORKD_TOKEN: daemon.token }),
    stderr: "pipe",
  });
  transport.stderr?.on("data", (d: Buffer) => (serverStderr += d.toString()));
  client = new Client({ name: "forkd-mcp-test", version: "0.0.0" });
  await client.connect(transport);
});

afterAll(async () => {
  await client?.close();
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
});

describe("tools", () => {
  it("lists forkd's 11 tools under their names, and the file tools, each with a described JSON schema", async () => {
    const { tools } = await client.listTools();
    const byName = new Map(tools.map((t) => [t.name, t]));
    const forkdTools = [
      "list_snapshots",
      "spawn_sandboxes",
      "branch_sandbox",
      "create_snapshot",
      "wait_for_text",
      "list_sandboxes",
      "get_sandbox",
      "kill_sandbox",
      "exec_command",
      "eval_code",
      "ping_sandbox",
    ];
    for (const name of [...forkdTools, "read_file", "write_file", "list_files"]) {
      const tool = byName.get(name);
      expect(tool, name).toBeDefined();
      expect(tool!.description?.length, name).toBeGreaterThan(10);
      expect(tool!.inputSchema.type).toBe("object");
    }
    // forkd's argument names, and their required set
    const schema = (name: string) => byName.get(name)!.inputSchema as { properties: Record<string, Json>; required?: string[] };
    expect(Object.keys(schema("spawn_sandboxes").properties)).toEqual(
      expect.arrayContaining(["snapshot_tag", "n", "per_child_netns", "memory_limit_mib", "prewarm", "live_fork"]),
    );
    expect(schema("spawn_sandboxes").required).toEqual(["snapshot_tag"]);
    expect(Object.keys(schema("branch_sandbox").properties)).toEqual(
      expect.arrayContaining(["sandbox_id", "tag", "diff", "measure_diff", "mode", "wait"]),
    );
    expect(Object.keys(schema("create_snapshot").properties)).toEqual(
      expect.arrayContaining(["tag", "kernel", "rootfs", "rw", "tap", "boot_wait_secs", "image", "warm", "memory_mib"]),
    );
    expect(schema("wait_for_text").required?.sort()).toEqual(["marker", "path", "sandbox_id"]);
    expect(schema("exec_command").properties.args).toMatchObject({ type: "array", items: { type: "string" } });
    expect(schema("exec_command").properties.timeout_secs).toMatchObject({ default: 30 });
    expect(schema("eval_code").required?.sort()).toEqual(["code", "sandbox_id"]);
    expect(schema("exec_command").properties.sandbox_id?.description).toBeTruthy();
  });
});

describe("a sandbox's life through MCP", () => {
  let id: string;
  let other: string;

  it("create_snapshot builds a small warm snapshot, with progress, and says forkd's kernel/rootfs were not used", async () => {
    const progress: Progress[] = [];
    const res = await call(
      "create_snapshot",
      { tag: TAG, memory_mib: 128, warm_eval: ["globalThis.warmed = 'yes'"], kernel: "/boot/vmlinuz", rootfs: "/tmp/rootfs.ext4" },
      (p) => progress.push(p),
    );
    expect(res.isError, text(res)).toBeFalsy();
    expect(res.structuredContent).toMatchObject({ tag: TAG, memory_mib: 128, status: "ready" });
    expect(text(res)).toMatch(/kernel, rootfs ignored/);
    // (The SDK's client handles a response before a notification that came with it, so the
    // last one, "done", may be dropped: count the heartbeats, which grow.)
    expect(progress.length).toBeGreaterThanOrEqual(2);
    expect(progress.every((p, i) => i === 0 || p.progress > progress[i - 1]!.progress)).toBe(true);
    const listed = (await ok("list_snapshots", {})).result as Json[];
    expect(listed.map((s) => s.tag)).toContain(TAG);
  });

  it("spawn_sandboxes forks two, one text per sandbox, with progress", async () => {
    const progress: Progress[] = [];
    const res = await call("spawn_sandboxes", { snapshot_tag: TAG, n: 2 }, (p) => progress.push(p));
    expect(res.isError, text(res)).toBeFalsy();
    const sandboxes = (res.structuredContent as { result: Json[] }).result;
    expect(sandboxes).toHaveLength(2);
    expect(res.content).toHaveLength(2);
    expect(JSON.parse((res.content[0] as { text: string }).text)).toMatchObject({ id: sandboxes[0]!.id });
    expect(progress.length).toBeGreaterThanOrEqual(1);
    [id, other] = sandboxes.map((s) => s.id as string) as [string, string];
    const listed = (await ok("list_sandboxes", {})).result as Json[];
    expect(listed.map((s) => s.id)).toEqual(expect.arrayContaining([id, other]));
    expect(await ok("get_sandbox", { sandbox_id: id })).toMatchObject({ id, snapshot_tag: TAG });
    expect(await ok("ping_sandbox", { sandbox_id: id })).toMatchObject({ hostname: id });
  });

  it("exec_command runs an argv and reports output and status", async () => {
    const res = await ok("exec_command", { sandbox_id: id, args: ["sh", "-c", "echo out; echo err >&2; exit 3"] });
    expect(res).toMatchObject({ stdout: "out\n", stderr: "err\n", exit_code: 3 });
    // forkd's timeout_secs: a command that outlives it is stopped
    const slow = await ok("exec_command", { sandbox_id: id, args: ["sleep", "30"], timeout_secs: 1 });
    expect(slow.timed_out).toBe(true);
  });

  it("eval_code evaluates in the warm context, which persists between calls", async () => {
    expect(await ok("eval_code", { sandbox_id: id, code: "globalThis.warmed" })).toMatchObject({ value: "yes" });
    await ok("eval_code", { sandbox_id: id, code: "globalThis.n = 21" });
    expect(await ok("eval_code", { sandbox_id: id, code: "n * 2" })).toMatchObject({ value: 42 });
  });

  it("write_file and read_file move text and bytes; list_files sees the file", async () => {
    const content = "héllo\nwörld ✓\n";
    expect(await ok("write_file", { sandbox_id: id, path: "/tmp/note.txt", content })).toMatchObject({ path: "/tmp/note.txt" });
    expect(await ok("read_file", { sandbox_id: id, path: "/tmp/note.txt" })).toMatchObject({ content, encoding: "utf8" });
    // Bytes that are not UTF-8 come back base64 whatever was asked, never mangled.
    const bytes = Buffer.from([0xff, 0x00, 0xfe, 0x41]);
    await ok("write_file", { sandbox_id: id, path: "/tmp/bin", content: bytes.toString("base64"), encoding: "base64" });
    const back = await ok("read_file", { sandbox_id: id, path: "/tmp/bin" });
    expect(back).toMatchObject({ encoding: "base64", size: 4 });
    expect(Buffer.from(back.content as string, "base64")).toEqual(bytes);
    const listing = await ok("list_files", { sandbox_id: id, path: "/tmp" });
    expect(JSON.stringify(listing.entries)).toContain("note.txt");
  });

  it("wait_for_text sees a marker a background writer adds later, with progress; and times out on one that never comes", async () => {
    await ok("exec_command", {
      sandbox_id: id,
      args: ["sh", "-c", "(sleep 1.5; echo 'booting'; echo 'SERVER READY on 8080') >> /tmp/app.log 2>&1 </dev/null & exit 0"],
    });
    const progress: Progress[] = [];
    const found = await ok(
      "wait_for_text",
      { sandbox_id: id, path: "/tmp/app.log", marker: "READY on 8080", timeout_secs: 30, poll_interval_ms: 100 },
      (p) => progress.push(p),
    );
    expect(found).toMatchObject({ found: true, last_excerpt: expect.stringContaining("SERVER READY on 8080") });
    expect(found.elapsed_ms).toBeGreaterThan(500);
    expect(progress.length).toBeGreaterThanOrEqual(1);
    const missed = await ok("wait_for_text", {
      sandbox_id: id,
      path: "/tmp/app.log",
      marker: "NEVER",
      timeout_secs: 0.6,
      poll_interval_ms: 100,
    });
    expect(missed).toMatchObject({ found: false, last_excerpt: expect.stringContaining("SERVER READY") });
    expect(missed.elapsed_ms).toBeLessThan(5000);
    // The excerpt is the last 256 characters, as forkd returns it.
    await ok("write_file", { sandbox_id: id, path: "/tmp/long.log", content: `${"x".repeat(5000)}END` });
    const long = await ok("wait_for_text", { sandbox_id: id, path: "/tmp/long.log", marker: "END" });
    expect((long.last_excerpt as string).length).toBe(256);
  });

  it("wait_for_text passes the path as one argument: shell syntax in it is a file name, not a command", async () => {
    // Through a shell this path would print the marker itself (and find it); as one argv
    // element it names a file that does not contain it.
    const hostile = "/tmp/q b;echo MARK-7;$(echo MARK-7) `echo MARK-7`";
    await ok("write_file", { sandbox_id: id, path: hostile, content: "no marker here\n" });
    const timeout = { sandbox_id: id, path: hostile, marker: "MARK-7", timeout_secs: 0.5, poll_interval_ms: 100 };
    expect(await ok("wait_for_text", timeout)).toMatchObject({ found: false, last_excerpt: "no marker here\n" });
    await ok("write_file", { sandbox_id: id, path: hostile, content: "MARK-7\n" });
    expect(await ok("wait_for_text", timeout)).toMatchObject({ found: true, last_excerpt: "MARK-7\n" });
  });

  it("wait_for_text still works in a sandbox without tail, through the files API", async () => {
    await ok("exec_command", { sandbox_id: other, args: ["sh", "-c", 'for t in $(which -a tail); do rm -f "$t"; done'] });
    expect(await ok("exec_command", { sandbox_id: other, args: ["tail", "-c", "1", "/etc/hostname"] })).toMatchObject({ exit_code: 127 });
    await ok("exec_command", {
      sandbox_id: other,
      args: ["sh", "-c", "(sleep 1; echo LATE-MARK) > /tmp/late.log 2>&1 </dev/null & exit 0"],
    });
    const found = await ok("wait_for_text", { sandbox_id: other, path: "/tmp/late.log", marker: "LATE-MARK", timeout_secs: 20 });
    expect(found).toMatchObject({ found: true, last_excerpt: "LATE-MARK\n" });
    expect(found.elapsed_ms).toBeGreaterThan(300);
  });

  it("branch_sandbox captures the running state, and a sandbox spawned from the branch has it", async () => {
    await ok("write_file", { sandbox_id: id, path: "/tmp/state", content: "before-branch" });
    const progress: Progress[] = [];
    const branch = await ok("branch_sandbox", { sandbox_id: id, tag: BRANCH_TAG }, (p) => progress.push(p));
    expect(branch).toMatchObject({ tag: BRANCH_TAG, status: "ready" });
    expect(progress.length).toBeGreaterThanOrEqual(1);
    // the source keeps running
    expect(await ok("ping_sandbox", { sandbox_id: id })).toMatchObject({ hostname: id });
    const child = ((await ok("spawn_sandboxes", { snapshot_tag: BRANCH_TAG })).result as Json[])[0]!;
    expect(await ok("read_file", { sandbox_id: child.id, path: "/tmp/state" })).toMatchObject({ content: "before-branch" });
    expect(await ok("kill_sandbox", { sandbox_id: child.id })).toEqual({ id: child.id, killed: true });
  });

  it("bad arguments are tool errors, and the server answers the next call", async () => {
    const bad: [string, Json, RegExp][] = [
      ["exec_command", { sandbox_id: id, args: "ls" }, /expected array.*at args/],
      ["exec_command", { sandbox_id: id, args: [] }, /args/],
      ["spawn_sandboxes", { snapshot_tag: TAG, n: 0 }, /at n\b/],
      ["get_sandbox", {}, /sandbox_id/],
      ["eval_code", { sandbox_id: id, code: "1", timeout: 5 }, /Unrecognized key.*timeout/],
      ["branch_sandbox", { sandbox_id: id, mode: "sideways" }, /mode/],
      ["no_such_tool", {}, /no_such_tool/],
    ];
    for (const [name, args, mentions] of bad) {
      const res = await call(name, args);
      expect(res.isError, `${name} ${JSON.stringify(args)}`).toBe(true);
      expect(text(res)).toMatch(mentions);
    }
    expect(await ok("ping_sandbox", { sandbox_id: id })).toMatchObject({ hostname: id });
  });

  it("a daemon error is a tool error showing the daemon's message, code and remediation", async () => {
    expect(await ok("kill_sandbox", { sandbox_id: other })).toEqual({ id: other, killed: true });
    const gone = await call("get_sandbox", { sandbox_id: other });
    expect(gone.isError).toBe(true);
    const err = gone.structuredContent as { error: string; code: string; status: number; remediation?: string };
    expect(err).toMatchObject({ status: 404, code: "sandbox_not_found", error: expect.stringContaining(other) });
    expect(err.remediation).toEqual(expect.any(String));
    expect(text(gone)).toContain(err.error);
    expect(text(gone)).toContain("sandbox_not_found");
    expect(text(gone)).toContain(`remediation: ${err.remediation}`);
    // one the daemon refuses with 4xx, not 404
    const dup = await call("create_snapshot", { tag: TAG });
    expect(dup.isError).toBe(true);
    expect(text(dup)).toMatch(/already exists/);
    expect(serverStderr).not.toMatch(/unexpected error|TypeError/);
  });
});

describe("streamable HTTP", () => {
  let child: ChildProcess | undefined;
  let url: string;

  beforeAll(async () => {
    // No FORKD_URL/FORKD_TOKEN: the server finds the daemon's socket in FORKD_RUN_DIR, which needs no token.
    child = spawn(process.execPath, [CLI, "mcp", "--http", "127.0.0.1:0", "--token-file", daemon.tokenFile], {
      env: mcpEnv({ FORKD_URL: undefined, FORKD_TOKEN: undefined }),
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const deadline = Date.now() + 30_000;
    for (;;) {
      const m = /serving (http:\/\/\S+)/.exec(stderr);
      if (m) {
        url = m[1]!;
        break;
      }
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`forkd mcp --http did not start: ${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  afterAll(() => {
    child?.kill("SIGTERM");
  });

  it("serves the tools to a client with the daemon's token", async () => {
    const http = new Client({ name: "forkd-mcp-http-test", version: "0.0.0" });
    await http.connect(
      new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers: { authorization: `Bearer ${daemon.token}` } } }),
    );
    try {
      expect((await http.listTools()).tools.map((t) => t.name)).toContain("wait_for_text");
      const res = (await http.callTool({ name: "list_snapshots", arguments: {} })) as CallToolResult;
      expect(res.isError, text(res)).toBeFalsy();
      expect(((res.structuredContent as { result: Json[] }).result ?? []).map((s) => s.tag)).toContain(TAG);
    } finally {
      await http.close();
    }
  });

  it("answers 401 without the token, or with a wrong one", async () => {
    const init = {
      jsonrpc: "2.0",
      id: 1,
      method: "initialize",
      params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "x", version: "0" } },
    };
    for (const authorization of [undefined, `Bearer ${"x".repeat(daemon.token.length)}`]) {
      const res = await fetch(url, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          accept: "application/json, text/event-stream",
          ...(authorization ? { authorization } : {}),
        },
        body: JSON.stringify(init),
      });
      expect(res.status).toBe(401);
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
      expect(await res.json()).toMatchObject({ code: "unauthorized", remediation: expect.any(String) });
    }
    const sdk = new Client({ name: "no-token", version: "0" });
    await expect(sdk.connect(new StreamableHTTPClientTransport(new URL(url)))).rejects.toThrow();
  });

  it("refuses to listen off loopback without TLS", () => {
    const res = spawnSync(process.execPath, [CLI, "mcp", "--http", "0.0.0.0:0", "--token-file", daemon.tokenFile], {
      env: process.env,
      encoding: "utf8",
      timeout: 30_000,
    });
    expect(res.status).not.toBe(0);
    expect(res.stderr).toMatch(/without TLS/);
  });
});
