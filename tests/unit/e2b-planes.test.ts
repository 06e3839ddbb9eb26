// E2B's planes on the daemon's port, without a VM: the dispatch (envd requests
// never reach forkd's /v1 or the control plane), the credential (E2B's key opens
// the control plane only, the bearer token keeps working), E2B's error shape, and
// tamper-proof paging tokens.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError } from "@forkd/core";
import { buildServer, createServerContext, type ServerContext } from "@forkd/daemon";
import { e2bApiKey, e2bErrorOf, parseGuestProbe } from "@forkd/e2b";
import type { FastifyInstance } from "fastify";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const TOKEN = "e2b-planes-test-token-0123456789abcdef";
const KEY = e2bApiKey(TOKEN);

let root: string;
let ctx: ServerContext;
let tcp: FastifyInstance;

beforeAll(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-e2b-planes-"));
  process.env.FORKD_HOME = path.join(root, "home");
  process.env.FORKD_RUN_DIR = path.join(root, "run");
  fs.mkdirSync(process.env.FORKD_HOME, { mode: 0o700 });
  fs.mkdirSync(process.env.FORKD_RUN_DIR, { mode: 0o700 });
  ctx = createServerContext({ token: TOKEN, auditLog: undefined, log: () => {} });
  tcp = await buildServer(ctx, { requireToken: true });
  await tcp.ready();
});

afterAll(async () => {
  await tcp?.close();
  fs.rmSync(root, { recursive: true, force: true });
});

function expectE2bError(res: { statusCode: number; json: () => unknown }, status: number): void {
  expect(res.statusCode).toBe(status);
  const body = res.json() as { code: number; message: string };
  expect(body.code).toBe(status);
  expect(body.message).toEqual(expect.any(String));
}

describe("the E2B key", () => {
  it("is shaped like E2B's, derived from the token, and differs per token", () => {
    expect(KEY).toMatch(/^e2b_[0-9a-f]{40}$/);
    expect(e2bApiKey(TOKEN)).toBe(KEY);
    expect(e2bApiKey(`${TOKEN}x`)).not.toBe(KEY);
  });

  it("opens the control plane; a wrong or missing key is E2B's 401", async () => {
    expect((await tcp.inject({ method: "GET", url: "/v2/sandboxes", headers: { "x-api-key": KEY } })).statusCode).toBe(200);
    expect((await tcp.inject({ method: "GET", url: "/v2/sandboxes", headers: { authorization: `Bearer ${TOKEN}` } })).statusCode).toBe(200);
    expectE2bError(await tcp.inject({ method: "GET", url: "/v2/sandboxes" }), 401);
    expectE2bError(await tcp.inject({ method: "GET", url: "/v2/sandboxes", headers: { "x-api-key": `${KEY.slice(0, -1)}0` } }), 401);
    expectE2bError(await tcp.inject({ method: "GET", url: "/v2/sandboxes", headers: { "x-api-key": TOKEN } }), 401);
  });

  it("does not open forkd's own API", async () => {
    const res = await tcp.inject({ method: "GET", url: "/v1/sandboxes", headers: { "x-api-key": KEY } });
    expect(res.statusCode).toBe(401);
    expect((res.json() as { code: string }).code).toBe("unauthorized");
  });
});

describe("dispatch", () => {
  it("sends a request carrying E2b-Sandbox-Id to envd's routes only, never to /v1 or the control plane", async () => {
    for (const url of ["/v1/sandboxes", "/v2/sandboxes", "/version"]) {
      const res = await tcp.inject({ method: "GET", url, headers: { "e2b-sandbox-id": "inope", authorization: `Bearer ${TOKEN}` } });
      expectE2bError(res, 404);
    }
  });

  it("sends a bare signed /files URL (no header, as the SDK's downloadUrl gives it) to envd, which checks its signature", async () => {
    // A forged signature: answered by the envd plane in E2B's shape, not by forkd's bearer check.
    const forged = await tcp.inject({ method: "GET", url: "/files?path=/etc/shadow&signature=v1_forged&signature_expiration=9999999999" });
    expectE2bError(forged, 401);
    // Without a signature a bare /files is nobody's: forkd's own refusal of a request without a token.
    const bare = await tcp.inject({ method: "GET", url: "/files?path=/etc/shadow" });
    expect(bare.statusCode).toBe(401);
    expect((bare.json() as { code: string }).code).toBe("unauthorized");
  });

  it("answers an unknown control route with E2B's 404 and leaves forkd's 404 alone", async () => {
    expectE2bError(await tcp.inject({ method: "GET", url: "/sandboxes/inope/nothing", headers: { "x-api-key": KEY } }), 404);
    const own = await tcp.inject({ method: "GET", url: "/v1/nothing", headers: { authorization: `Bearer ${TOKEN}` } });
    expect(own.statusCode).toBe(404);
    expect((own.json() as { code: string }).code).toBe("not_found");
  });
});

describe("control plane validation", () => {
  const headers = { "x-api-key": KEY, "content-type": "application/json" };
  it("refuses a bad body with E2B's 400 and an unknown template with 404", async () => {
    expectE2bError(await tcp.inject({ method: "POST", url: "/v2/sandboxes", headers, payload: { timeout: 5 } }), 400);
    expectE2bError(await tcp.inject({ method: "POST", url: "/v2/sandboxes", headers, payload: { templateID: "base", timeout: -1 } }), 400);
    expectE2bError(
      await tcp.inject({ method: "POST", url: "/sandboxes", headers, payload: { templateID: "no-such-template", timeout: 5 } }),
      404,
    );
    expectE2bError(await tcp.inject({ method: "POST", url: "/v2/sandboxes", headers, payload: { templateID: "../etc", timeout: 5 } }), 404);
  });

  it("answers an unknown sandbox with 404 on every call that names one", async () => {
    for (const [method, url, payload] of [
      ["GET", "/sandboxes/inope", undefined],
      ["DELETE", "/sandboxes/inope", undefined],
      ["POST", "/sandboxes/inope/timeout", { timeout: 5 }],
      ["POST", "/sandboxes/inope/pause", {}],
      ["POST", "/v2/sandboxes/inope/connect", { timeout: 5 }],
    ] as const) {
      expectE2bError(await tcp.inject({ method, url, headers, ...(payload ? { payload } : {}) }), 404);
    }
  });

  it("refuses a paging token that was not issued unchanged", async () => {
    for (const nextToken of ["garbage", "eyJ4IjoxfQ.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "a.b.c"]) {
      expectE2bError(await tcp.inject({ method: "GET", url: `/v2/sandboxes?nextToken=${nextToken}`, headers }), 400);
    }
    expectE2bError(await tcp.inject({ method: "GET", url: "/v2/sandboxes?state=zombie", headers }), 400);
    expectE2bError(await tcp.inject({ method: "GET", url: "/v2/sandboxes?limit=0", headers }), 400);
  });
});

describe("the unmodified e2b SDK against the control plane", () => {
  let url: string;
  beforeAll(async () => {
    await tcp.listen({ host: "127.0.0.1", port: 0 });
    const address = tcp.server.address();
    url = `http://127.0.0.1:${typeof address === "object" && address ? address.port : 0}`;
  });
  const opts = () => ({ apiKey: KEY, apiUrl: url, sandboxUrl: url });

  it("lists, and raises the SDK's own error classes", async () => {
    const { AuthenticationError, Sandbox, SandboxNotFoundError } = await import("e2b");
    const page = Sandbox.list(opts());
    expect(await page.nextItems()).toEqual([]);
    expect(page.hasNext).toBe(false);
    await expect(Sandbox.getInfo("inope", opts())).rejects.toBeInstanceOf(SandboxNotFoundError);
    await expect(Sandbox.kill("inope", opts())).resolves.toBe(false);
    await expect(Sandbox.list({ ...opts(), apiKey: e2bApiKey("another-token-0123456789abcdef") }).nextItems()).rejects.toBeInstanceOf(
      AuthenticationError,
    );
    await expect(Sandbox.create("no-such-template", opts())).rejects.toThrow(/404/);
  });
});

describe("errors and the guest's metrics", () => {
  it("maps forkd's over-limit refusal onto E2B's 429 with Retry-After (the SDK retries those)", () => {
    expect(e2bErrorOf(new ForkdError("over_limit", "too many sandboxes", { retry_after_s: 7 }))).toEqual({
      status: 429,
      message: "too many sandboxes",
      retryAfterS: 7,
    });
    expect(e2bErrorOf(new ForkdError("sandbox_not_found", "gone")).status).toBe(404);
    expect(e2bErrorOf(new Error("boom"))).toEqual({ status: 500, message: "internal error; see the forkd daemon's log" });
  });

  it("reads the guest's probe as numbers only; anything else is zero", () => {
    const good =
      "MemTotal:         230000 kB\nMemAvailable:     130000 kB\nCached:            20000 kB\nFilesystem     1024-blocks    Used Available Capacity Mounted on\n/dev/vda           1000000  400000    600000      40% /\n";
    expect(parseGuestProbe(good)).toEqual({
      memTotal: 230000 * 1024,
      memUsed: 100000 * 1024,
      memCache: 20000 * 1024,
      diskTotal: 1000000 * 1024,
      diskUsed: 400000 * 1024,
    });
    for (const hostile of [
      "",
      "MemTotal: -5 kB",
      `MemTotal: ${"9".repeat(400)} kB`,
      "\u0000".repeat(100),
      "MemAvailable: 999999999 kB\nMemTotal: 1 kB",
    ]) {
      const parsed = parseGuestProbe(hostile);
      for (const v of Object.values(parsed)) {
        expect(Number.isFinite(v)).toBe(true);
        expect(v).toBeGreaterThanOrEqual(0);
      }
    }
  });
});
