// The MCP server's pure parts: where it finds the daemon and how it reads the
// daemon's error bodies (the SDK's, which the MCP server uses), how results are
// shaped, and what --http accepts.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { errorResult, parseListen, readToken, toolResult } from "@forkd/mcp";
import { errorFromBody, resolveTarget } from "@forkd/sdk";
import { describe, expect, it } from "vitest";

describe("resolveTarget", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-mcp-"));
  fs.writeFileSync(path.join(dir, "token"), "local-token-0123456789\n", { mode: 0o600 });

  it("takes FORKD_URL and FORKD_TOKEN as forkd's clients do", () => {
    expect(resolveTarget({ FORKD_URL: "http://10.0.0.5:8889/", FORKD_TOKEN: " t0k3n-abcdefghijkl \n" })).toEqual({
      base: "http://10.0.0.5:8889",
      label: "http://10.0.0.5:8889",
      token: "t0k3n-abcdefghijkl",
    });
    expect(resolveTarget({ FORKD_URL: "unix:/run/x/forkd.sock" })).toMatchObject({ socketPath: "/run/x/forkd.sock" });
  });

  it("uses the local socket when it exists, else forkd's default URL", () => {
    const sock = path.join(dir, "forkd.sock");
    fs.writeFileSync(sock, "");
    expect(resolveTarget({ FORKD_RUN_DIR: dir, FORKD_HOME: "/nonexistent" })).toMatchObject({ socketPath: sock, label: `unix:${sock}` });
    fs.rmSync(sock);
    expect(resolveTarget({ FORKD_RUN_DIR: dir, FORKD_HOME: "/nonexistent" })).toEqual({
      base: "http://127.0.0.1:8889",
      label: "http://127.0.0.1:8889",
    });
  });

  it("offers the local token file to a local daemon only, never to a remote FORKD_URL", () => {
    expect(resolveTarget({ FORKD_URL: "http://127.0.0.1:9999", FORKD_HOME: dir }).token).toBe("local-token-0123456789");
    expect(resolveTarget({ FORKD_URL: "https://forkd.example.net", FORKD_HOME: dir }).token).toBeUndefined();
  });

  it("refuses a token file group or others can read, naming chmod 600 (the CLI finds its daemon through this too)", () => {
    const loose = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-token-"));
    fs.writeFileSync(path.join(loose, "token"), "local-token-0123456789\n", { mode: 0o644 });
    fs.chmodSync(path.join(loose, "token"), 0o644);
    expect(() => resolveTarget({ FORKD_URL: "http://127.0.0.1:9999", FORKD_HOME: loose })).toThrow(/mode 0644.*chmod 600/);
    fs.chmodSync(path.join(loose, "token"), 0o600);
    expect(resolveTarget({ FORKD_URL: "http://127.0.0.1:9999", FORKD_HOME: loose }).token).toBe("local-token-0123456789");
  });
});

describe("errorFromBody", () => {
  it("reads forkd's shape with our code and remediation", () => {
    const err = errorFromBody(404, { error: "sandbox sb-1 not found", code: "sandbox_not_found", remediation: "list_sandboxes" }, "");
    expect(err).toMatchObject({ status: 404, code: "sandbox_not_found", message: "sandbox sb-1 not found", remediation: "list_sandboxes" });
  });

  it("reads the older nested shape, and falls back to the text of anything else", () => {
    expect(errorFromBody(409, { error: { code: "conflict", message: "busy", details: { a: 1 } } }, "")).toMatchObject({
      code: "conflict",
      message: "busy",
      details: { a: 1 },
    });
    expect(errorFromBody(502, undefined, "<html>Bad Gateway</html>")).toMatchObject({
      code: "http_502",
      message: "<html>Bad Gateway</html>",
    });
    expect(errorFromBody(500, undefined, "")).toMatchObject({ message: "HTTP 500" });
  });

  it("becomes a tool error whose text carries message, code and remediation", () => {
    const res = errorResult(errorFromBody(400, { error: "bad tag", code: "invalid_tag", remediation: "use [A-Za-z0-9_-]" }, ""));
    expect(res.isError).toBe(true);
    const text = (res.content[0] as { text: string }).text;
    expect(text).toContain("400 invalid_tag: bad tag");
    expect(text).toContain("remediation: use [A-Za-z0-9_-]");
  });
});

describe("toolResult", () => {
  it("gives a list one text per element and structuredContent {result}, and an empty list a visible []", () => {
    const two = toolResult([{ id: "a" }, { id: "b" }]);
    expect(two.content).toHaveLength(2);
    expect(JSON.parse((two.content[1] as { text: string }).text)).toEqual({ id: "b" });
    expect(two.structuredContent).toEqual({ result: [{ id: "a" }, { id: "b" }] });
    expect(toolResult([]).content).toEqual([{ type: "text", text: "[]" }]);
    expect(toolResult({ found: true }).structuredContent).toEqual({ found: true });
  });
});

describe("parseListen", () => {
  it("takes HOST:PORT, [v6]:PORT or a bare port, and names the form when wrong", () => {
    expect(parseListen("127.0.0.1:8890")).toEqual({ host: "127.0.0.1", port: 8890 });
    expect(parseListen("[::1]:0")).toEqual({ host: "::1", port: 0 });
    expect(parseListen("8890")).toEqual({ host: "127.0.0.1", port: 8890 });
    for (const bad of ["localhost", "1.2.3.4:70000", ":80", "a:b"]) expect(() => parseListen(bad), bad).toThrow(/HOST:PORT/);
  });
});

describe("readToken (--token-file for MCP over HTTP)", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-mcp-token-"));
  const file = path.join(dir, "token");
  const token = "mcp-token-0123456789abcdef";

  it("reads a 0600 token file", () => {
    fs.writeFileSync(file, `${token}\n`, { mode: 0o600 });
    fs.chmodSync(file, 0o600);
    expect(readToken(file)).toBe(token);
  });

  it("refuses a token file group or others can read, naming chmod 600, as the daemon does", () => {
    for (const mode of [0o640, 0o604, 0o660]) {
      fs.writeFileSync(file, `${token}\n`);
      fs.chmodSync(file, mode);
      expect(() => readToken(file)).toThrow(new RegExp(`group or others can read or change it.*chmod 600 ${file}`));
    }
  });
});
