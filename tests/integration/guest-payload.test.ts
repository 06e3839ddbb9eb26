// Payloads a small guest cannot hold are refused by the daemon before they reach it:
// a 128 MiB guest's agent was OOM-killed by a ≈6 MiB files write or ≈5 MiB exec stdin
// and the call then waited for its deadline. The limit is 1/32 of guest memory (4 MiB here).
import { spawnSync } from "node:child_process";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const MIB = 2 ** 20;
const LIMIT = 4 * MIB;
let daemon: DaemonHandle;
let id: string;

async function call(method: string, route: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${daemon.token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
  const snap = await call("POST", "/v1/snapshots", { tag: "small-guest", memory_mib: 128 });
  expect(snap.status).toBe(201);
  const fork = await call("POST", "/v1/sandboxes", { snapshot_tag: "small-guest" });
  expect(fork.status).toBe(201);
  id = ((fork.body as unknown as { id: string }[])[0] ?? (fork.body as { id: string })).id;
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
});

const bytes = (n: number) => Buffer.alloc(n, 0x61).toString("base64");

describe("payloads over the guest's share of memory", () => {
  it("refuses a files write one byte over the limit with 413 at once, and the sandbox still answers", async () => {
    const t0 = performance.now();
    const res = await call("POST", `/v1/sandboxes/${id}/files`, {
      action: "write",
      path: "/root/big",
      data: bytes(LIMIT + 1),
      encoding: "base64",
    });
    expect(res.status).toBe(413);
    expect(res.body).toMatchObject({ code: "too_large", details: { limit_bytes: LIMIT, memory_mib: 128 } });
    expect(String(res.body.error)).toMatch(/at most 4194304 bytes.*memory_mib/);
    expect(performance.now() - t0).toBeLessThan(5_000);
    const exec = await call("POST", `/v1/sandboxes/${id}/exec`, { args: ["echo", "alive"] });
    expect(exec.body).toMatchObject({ exit_code: 0, stdout: "alive\n" });
    const missing = await call("POST", `/v1/sandboxes/${id}/files`, { action: "read", path: "/root/big" });
    expect(missing.status).toBe(404);
  });

  it("refuses exec stdin over the limit with 413, for a whole and a background exec", async () => {
    for (const extra of [{}, { background: true }]) {
      const res = await call("POST", `/v1/sandboxes/${id}/exec`, {
        args: ["wc", "-c"],
        stdin: bytes(LIMIT + 1),
        stdin_encoding: "base64",
        ...extra,
      });
      expect(res.status).toBe(413);
      expect(res.body).toMatchObject({ code: "too_large", details: { limit_bytes: LIMIT } });
    }
  });

  it("takes a files write and exec stdin at the limit", async () => {
    const write = await call("POST", `/v1/sandboxes/${id}/files`, {
      action: "write",
      path: "/root/big",
      data: bytes(LIMIT),
      encoding: "base64",
    });
    expect(write.status).toBe(200);
    const size = await call("POST", `/v1/sandboxes/${id}/exec`, { args: ["wc", "-c", "/root/big"] });
    expect(size.body).toMatchObject({ exit_code: 0, stdout: expect.stringContaining(String(LIMIT)) });
    await call("POST", `/v1/sandboxes/${id}/files`, { action: "remove", path: "/root/big" });
    const stdin = await call("POST", `/v1/sandboxes/${id}/exec`, { args: ["wc", "-c"], stdin: bytes(LIMIT), stdin_encoding: "base64" });
    expect(stdin.body).toMatchObject({ exit_code: 0, stdout: expect.stringContaining(String(LIMIT)) });
  });
});
