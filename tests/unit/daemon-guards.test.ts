// The daemon's guards that need no VM: the audit fields of a call (never a secret),
// bounded timeouts, token file permissions, and no plain HTTP off loopback.
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { isForkdError } from "@forkd/core";
import { boundedTimeout, describeCall, readTokenFile, startDaemon } from "@forkd/daemon";
import { describe, expect, it } from "vitest";

describe("audit fields of a call", () => {
  it("records the command of an exec, never its stdin or env values", () => {
    const body = { argv: ["python3", "-c", "print(1)"], stdin: "s3cret-stdin", env: { API_KEY: "s3cret-env" } };
    const fields = describeCall("/v1/sandboxes/:id/exec", body);
    expect(fields).toEqual({ exec: { argv: ["python3", "-c", "print(1)"] } });
    expect(JSON.stringify(fields)).not.toMatch(/s3cret/);
    expect(describeCall("/v1/sandboxes/:id/exec/stream", { cmd: "ls -l /", env: { X: "s3cret" } })).toEqual({ exec: { cmd: "ls -l /" } });
    expect(describeCall("/v1/sandboxes/:id/exec", { args: ["true"] })).toEqual({ exec: { argv: ["true"] } });
    // A body the schema refused: described only as far as its shape allows.
    expect(describeCall("/v1/sandboxes/:id/exec", { argv: [1, 2] })).toEqual({ exec: { invalid: true } });
    expect(describeCall("/v1/sandboxes/:id/exec", "not an object")).toEqual({});
  });

  it("records eval code by its sha256, never the code", () => {
    const code = "const token = 's3cret'; token.length";
    const fields = describeCall("/v1/sandboxes/:id/eval", { code, language: "javascript" });
    expect(fields).toEqual({
      eval: { sha256: createHash("sha256").update(code).digest("hex"), bytes: Buffer.byteLength(code), language: "javascript" },
    });
    expect(JSON.stringify(fields)).not.toMatch(/s3cret/);
  });

  it("records a files call's action and path, never its data", () => {
    const fields = describeCall("/v1/sandboxes/:id/files", { action: "write", path: "/root/.env", data: "PASSWORD=s3cret" });
    expect(fields).toEqual({ file: { action: "write", path: "/root/.env" } });
    expect(JSON.stringify(fields)).not.toMatch(/s3cret/);
  });

  it("bounds what one request can put in the log and ignores other routes", () => {
    const long = "x".repeat(100_000);
    const fields = describeCall("/v1/sandboxes/:id/exec", { cmd: long });
    expect(JSON.stringify(fields).length).toBeLessThan(5000);
    expect((describeCall("/v1/sandboxes/:id/exec", { argv: Array(10_000).fill("a") }).exec as { argv: string[] }).argv).toHaveLength(256);
    expect(describeCall("/v1/sandboxes/:id/processes/:pid/stdin", { data: "s3cret" })).toEqual({});
    expect(describeCall(undefined, { cmd: "x" })).toEqual({});
  });
});

describe("bounded timeouts", () => {
  it("accepts a whole number in range and refuses the rest with a 400 naming the field and range", () => {
    expect(boundedTimeout(undefined, "timeout_ms", "eval")).toBeUndefined();
    expect(boundedTimeout(3_600_000, "timeout_ms", "eval")).toBe(3_600_000);
    for (const bad of [0, -1, 1.5, 3_600_001, 2 ** 31, 2 ** 53, 1e300, Number.POSITIVE_INFINITY, Number.NaN]) {
      let caught: unknown;
      try {
        boundedTimeout(bad, "timeout_ms", "eval");
      } catch (err) {
        caught = err;
      }
      expect(isForkdError(caught, "bad_request"), String(bad)).toBe(true);
      expect((caught as Error).message).toMatch(/timeout_ms must be a whole number of ms from 1 to 3600000/);
    }
    expect(() => boundedTimeout(999, "timeout_ms", "sandbox")).toThrow(/from 1000 to 2592000000/);
    expect(() => boundedTimeout(61, "boot_wait_secs", "bootWait")).toThrow(/from 0 to 60/);
    expect(() => boundedTimeout(3601, "timeout_secs", "execSecs")).toThrow(/from 1 to 3600/);
  });
});

describe("token file permissions", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-token-"));
  const token = "Zq3v9Lr1Kx8Wm2Tn5Pb7Yc4Hd6";

  it("reads a 0600 token file", () => {
    const file = path.join(dir, "ok");
    fs.writeFileSync(file, `${token}\n`, { mode: 0o600 });
    expect(readTokenFile(file)).toBe(token);
  });

  it("refuses one group or others may read or write, naming the chmod that fixes it", () => {
    for (const mode of [0o644, 0o640, 0o604, 0o620, 0o602]) {
      const file = path.join(dir, `mode-${mode.toString(8)}`);
      fs.writeFileSync(file, `${token}\n`);
      fs.chmodSync(file, mode);
      expect(() => readTokenFile(file)).toThrow(new RegExp(`group or others can read or change it.*chmod 600 ${file}`));
    }
  });
});

describe("listening off loopback", () => {
  it("refuses plain HTTP on a non-loopback address unless --insecure-listen", async () => {
    const socket = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "forkd-listen-")), "s.sock");
    await expect(startDaemon({ listen: "0.0.0.0:0", tokenFile: "/nonexistent", socket, log: () => {} })).rejects.toThrow(
      /refusing to serve plain HTTP on 0\.0\.0\.0.*--tls-cert and --tls-key, or --insecure-listen/,
    );
  });
});
