// The daemon's HTTP contract without a VM: the real server (buildServer over the
// context startDaemon makes) answered through fastify's inject(), over an empty
// FORKD_HOME. Every failure is {error, code, remediation} with the status core's
// error table gives its code; refusals happen before any sandbox is looked for.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ERROR_STATUS, type ErrorCode, ForkdError } from "@forkd/core";
import { buildServer, createServerContext, REMEDIATION, type ServerContext } from "@forkd/daemon";
import type { FastifyInstance, InjectOptions } from "fastify";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const TOKEN = "contract-test-token-0123456789abcdef";
const AUTH = { authorization: `Bearer ${TOKEN}` };
/** Well formed, so the lookup (not the id check) answers. */
const UNKNOWN_SANDBOX = "sb-0123456789ab";

let root: string;
let auditFile: string;
let ctx: ServerContext;
let tcp: FastifyInstance;
let unix: FastifyInstance;

beforeAll(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-http-contract-"));
  process.env.FORKD_HOME = path.join(root, "home");
  process.env.FORKD_RUN_DIR = path.join(root, "run");
  fs.mkdirSync(process.env.FORKD_HOME, { mode: 0o700 });
  fs.mkdirSync(process.env.FORKD_RUN_DIR, { mode: 0o700 });
  auditFile = path.join(root, "audit.log");
  ctx = createServerContext({ token: TOKEN, auditLog: auditFile, log: () => {} });
  tcp = await buildServer(ctx, { requireToken: true });
  unix = await buildServer(ctx, { requireToken: false });
  // A route that fails with whatever code it is asked for: how each code leaves the server.
  tcp.get("/contract/throw/:code", async (request) => {
    const { code } = request.params as { code: ErrorCode };
    throw new ForkdError(code, `thrown as ${code}`, code === "over_limit" ? { retry_after_s: 7 } : {});
  });
  await Promise.all([tcp.ready(), unix.ready()]);
});

afterAll(async () => {
  await Promise.all([tcp?.close(), unix?.close()]);
  ctx?.audit.close();
  fs.rmSync(root, { recursive: true, force: true });
});

type ErrorReply = { error: string; code: ErrorCode; remediation: string; details?: Record<string, unknown> };

/** One request; the reply must be forkd's error body with the status its code has in the table. */
async function expectError(app: FastifyInstance, req: InjectOptions, code: ErrorCode): Promise<ErrorReply> {
  const res = await app.inject(req);
  const body = res.json() as ErrorReply;
  expect({ status: res.statusCode, code: body.code }, res.body).toEqual({ status: ERROR_STATUS[code], code });
  expect(res.headers["content-type"]).toMatch(/^application\/json/);
  expect(body.error).toEqual(expect.any(String));
  expect(body.error.length).toBeGreaterThan(0);
  expect(body.remediation).toBe(REMEDIATION[code]);
  return body;
}

describe("the bearer token on TCP", () => {
  it("refuses a request without a token or with a wrong one, and says how to authenticate", async () => {
    for (const headers of [{}, { authorization: "Bearer wrong" }, { authorization: TOKEN }, { authorization: `Basic ${TOKEN}` }]) {
      const body = await expectError(tcp, { method: "GET", url: "/v1/sandboxes", headers }, "unauthorized");
      expect(body.remediation).toMatch(/Authorization: Bearer/);
    }
    const res = await tcp.inject({ method: "GET", url: "/v1/sandboxes" });
    expect(res.headers["www-authenticate"]).toBe('Bearer realm="forkd"');
  });

  it("refuses before routing: an unknown path without a token is a 401, not a 404", async () => {
    await expectError(tcp, { method: "GET", url: "/v1/no-such-route" }, "unauthorized");
  });

  it("lets the right token through, and /healthz without one", async () => {
    const listed = await tcp.inject({ method: "GET", url: "/v1/sandboxes", headers: AUTH });
    expect(listed.statusCode, listed.body).toBe(200);
    expect(listed.json()).toEqual([]);
    const health = await tcp.inject({ method: "GET", url: "/healthz" });
    expect(health.statusCode).toBe(200);
    expect(health.json()).toEqual({ ok: true });
  });

  it("needs no token on the unix socket's server: its file mode is the credential", async () => {
    const res = await unix.inject({ method: "GET", url: "/v1/sandboxes" });
    expect(res.statusCode, res.body).toBe(200);
  });
});

describe("what does not exist", () => {
  it("answers an unknown sandbox with sandbox_not_found and an unknown snapshot with snapshot_not_found", async () => {
    const sandbox = await expectError(unix, { method: "GET", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}` }, "sandbox_not_found");
    expect(sandbox.error).toContain(UNKNOWN_SANDBOX);
    await expectError(unix, { method: "DELETE", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}` }, "sandbox_not_found");
    await expectError(
      unix,
      { method: "POST", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}/exec`, payload: { argv: ["true"] } },
      "sandbox_not_found",
    );
    const snapshot = await expectError(unix, { method: "GET", url: "/v1/snapshots/no-such-tag/status" }, "snapshot_not_found");
    expect(snapshot.details).toEqual({ tag: "no-such-tag" });
  });

  it("refuses an id or tag that is not one before looking it up", async () => {
    await expectError(unix, { method: "GET", url: "/v1/sandboxes/..%2F..%2Fetc" }, "invalid_id");
    await expectError(unix, { method: "GET", url: "/v1/snapshots/..hidden/status" }, "invalid_tag");
  });

  it("answers an unknown route, and a known path with a method it lacks, with not_found naming both", async () => {
    const unknown = await expectError(unix, { method: "GET", url: "/v1/nothing-here?x=1" }, "not_found");
    expect(unknown.error).toContain("GET /v1/nothing-here;");
    // Fastify answers an unsupported method as an unknown route (404), never as a 405 with another body.
    const wrongMethod = await expectError(unix, { method: "PUT", url: "/v1/sandboxes" }, "not_found");
    expect(wrongMethod.error).toContain("PUT /v1/sandboxes");
    await expectError(unix, { method: "PATCH", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}` }, "not_found");
  });
});

describe("bad bodies", () => {
  it("refuses a body that does not match the schema with validation_failed naming the field", async () => {
    const wrongType = await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", payload: { snapshot_tag: "base", n: "three" } },
      "validation_failed",
    );
    expect(wrongType.error).toMatch(/\bn\b/);
    const missing = await expectError(unix, { method: "POST", url: "/v1/sandboxes", payload: { n: 1 } }, "validation_failed");
    expect(missing.error).toContain("snapshot_tag");
    const unknownField = await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", payload: { snapshot_tag: "base", surprise: true } },
      "validation_failed",
    );
    expect(unknownField.error).toContain("surprise");
  });

  it("refuses a timeout out of range with bad_request naming the field and its range, before any VM is touched", async () => {
    for (const timeout_ms of [0, -5, 1.5, 2 ** 53]) {
      const body = await expectError(
        unix,
        { method: "POST", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}/exec`, payload: { argv: ["true"], timeout_ms } },
        "bad_request",
      );
      expect(body.error).toContain("timeout_ms");
      expect(body.details).toMatchObject({ field: "timeout_ms", min: expect.any(Number), max: expect.any(Number) });
    }
    const fork = await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", payload: { snapshot_tag: "base", timeout_ms: 0 } },
      "bad_request",
    );
    expect(fork.details).toMatchObject({ field: "timeout_ms" });
  });

  it("refuses what is not JSON: another content type (415), malformed JSON (400), a body over the limit (413)", async () => {
    await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", headers: { "content-type": "text/plain" }, payload: "snapshot_tag=base" },
      "unsupported_media_type",
    );
    await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", headers: { "content-type": "application/x-www-form-urlencoded" }, payload: "a=b" },
      "unsupported_media_type",
    );
    const malformed = await expectError(
      unix,
      { method: "POST", url: "/v1/sandboxes", headers: { "content-type": "application/json" }, payload: '{"snapshot_tag": ' },
      "bad_request",
    );
    expect(malformed.error).toMatch(/not valid JSON/);
    await expectError(
      unix,
      {
        method: "POST",
        url: `/v1/sandboxes/${UNKNOWN_SANDBOX}/files`,
        headers: { "content-type": "application/json" },
        payload: JSON.stringify({ action: "write", path: "/tmp/x", data: "x".repeat(13 * 2 ** 20) }),
      },
      "too_large",
    );
  });

  it("takes an empty JSON body as no body (forkd's clients send one on calls that take none)", async () => {
    const res = await unix.inject({
      method: "POST",
      url: `/v1/sandboxes/${UNKNOWN_SANDBOX}/ping`,
      headers: { "content-type": "application/json" },
      payload: "",
    });
    expect(res.json().code).toBe("sandbox_not_found");
  });
});

describe("pack and unpack paths", () => {
  const json = { ...AUTH, "content-type": "application/json" };
  it("over TCP (the token) refuses any path outside $FORKD_HOME/packs, before looking for the snapshot, naming the directory", async () => {
    const packs = path.join(process.env.FORKD_HOME!, "packs");
    for (const p of ["/etc/cron.d/forkd", "/tmp/x.forkd.tar.zst", "../token", `${packs}/../token`]) {
      const packed = await expectError(
        tcp,
        { method: "POST", url: "/v1/snapshots/base/pack", headers: json, payload: { path: p } },
        "bad_request",
      );
      expect(packed.error).toContain(packs);
      expect(packed.details).toMatchObject({ allowed_dir: packs });
      const unpacked = await expectError(
        tcp,
        { method: "POST", url: "/v1/snapshots/unpack", headers: json, payload: { path: p } },
        "bad_request",
      );
      expect(unpacked.error).toContain(packs);
    }
    fs.mkdirSync(packs, { recursive: true, mode: 0o700 });
    fs.symlinkSync("/etc/passwd", path.join(packs, "passwd.tar.zst"));
    await expectError(
      tcp,
      { method: "POST", url: "/v1/snapshots/unpack", headers: json, payload: { path: "passwd.tar.zst" } },
      "bad_request",
    );
  });

  it("over TCP a name inside the packs directory gets as far as the snapshot lookup; over the unix socket the caller's absolute path does", async () => {
    await expectError(
      tcp,
      { method: "POST", url: "/v1/snapshots/base/pack", headers: json, payload: { path: "base.forkd.tar.zst" } },
      "snapshot_not_found",
    );
    await expectError(
      unix,
      { method: "POST", url: "/v1/snapshots/base/pack", headers: json, payload: { path: "/tmp/x.forkd.tar.zst" } },
      "snapshot_not_found",
    );
    await expectError(
      unix,
      { method: "POST", url: "/v1/snapshots/base/pack", headers: json, payload: { path: "relative.tar.zst" } },
      "bad_request",
    );
    await expectError(
      tcp,
      { method: "POST", url: "/v1/snapshots/unpack", headers: json, payload: { path: "missing.tar.zst" } },
      "not_found",
    );
  });
});

describe("the error table", () => {
  it("sends every code with the status the table gives it, its own remediation, and Retry-After on over_limit", async () => {
    const codes = Object.keys(ERROR_STATUS) as ErrorCode[];
    expect(codes.length).toBeGreaterThan(20);
    for (const code of codes) {
      const body = await expectError(tcp, { method: "GET", url: `/contract/throw/${code}`, headers: AUTH }, code);
      expect(body.error).toBe(`thrown as ${code}`);
      // Only an internal error is forkd's bug: every other code says what the caller can do.
      if (code !== "internal") expect(body.remediation, code).not.toMatch(/bug in forkd/);
    }
    const limited = await tcp.inject({ method: "GET", url: "/contract/throw/over_limit", headers: AUTH });
    expect(limited.headers["retry-after"]).toBe("7");
  });

  it("has one remediation per code and no stale entry", () => {
    expect(Object.keys(REMEDIATION).sort()).toEqual(Object.keys(ERROR_STATUS).sort());
    for (const [code, line] of Object.entries(REMEDIATION)) expect(line.length, code).toBeGreaterThan(10);
  });

  it("lists the closed set of codes in the OpenAPI document's error bodies", async () => {
    const doc = (await unix.inject({ method: "GET", url: "/v1/openapi.json" })).json() as {
      paths: Record<string, Record<string, { responses: Record<string, { content: Record<string, { schema: unknown }> }> }>>;
    };
    const notFound = doc.paths["/v1/sandboxes/{id}"]?.get?.responses["404"]?.content["application/json"]?.schema as {
      properties: { code: { enum: string[] } };
    };
    expect([...notFound.properties.code.enum].sort()).toEqual(Object.keys(ERROR_STATUS).sort());
  });

  it("records the code of each refusal in the audit log", async () => {
    await tcp.inject({ method: "GET", url: `/v1/sandboxes/${UNKNOWN_SANDBOX}`, headers: AUTH });
    const lines = fs
      .readFileSync(auditFile, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { path: string; status: number; error_code?: string });
    expect(lines.at(-1)).toMatchObject({ path: `/v1/sandboxes/${UNKNOWN_SANDBOX}`, status: 404, error_code: "sandbox_not_found" });
    expect(lines.some((l) => l.status === 401 && l.error_code === "unauthorized")).toBe(true);
  });
});
