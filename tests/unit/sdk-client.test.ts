// The SDK's Controller is the one client of the daemon (the CLI, Sandbox and the
// MCP server use it): a call that gets no answer is a ForkdApiError with a code
// saying why, an error body reaches the caller whole, and the SDK takes nothing
// from the daemon package but types.
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { Controller, ForkdApiError } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const SDK = path.resolve(import.meta.dirname, "../../packages/sdk");

describe("Controller errors", () => {
  let server: http.Server;
  let url: string;
  beforeAll(async () => {
    server = http.createServer((req, res) => {
      if (req.url?.startsWith("/hang/")) return; // never answers
      if (req.url?.startsWith("/proxy/")) {
        res.writeHead(502, { "content-type": "text/html" }).end("<html>Bad Gateway</html>");
        return;
      }
      res
        .writeHead(404, { "content-type": "application/json" })
        .end(JSON.stringify({ error: "sandbox sb-1 not found", code: "sandbox_not_found", remediation: "list them" }));
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(() => {
    server.closeAllConnections();
    server.close();
  });

  const failure = async (work: Promise<unknown>) => {
    const err = await work.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ForkdApiError);
    return err as ForkdApiError;
  };

  it("carries the daemon's message, code and remediation, and a proxy's text as it came", async () => {
    const c = new Controller({ url });
    expect(await failure(c.getSandbox("sb-1"))).toMatchObject({
      status: 404,
      code: "sandbox_not_found",
      message: "sandbox sb-1 not found",
      remediation: "list them",
    });
    const proxied = new Controller({ url: `${url}/proxy` });
    expect(await failure(proxied.health())).toMatchObject({ status: 502, code: "http_502", message: "<html>Bad Gateway</html>" });
    await c.close();
  });

  it("says daemon_unreachable, timeout or cancelled, naming where it looked", async () => {
    const sock = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "forkd-sdk-")), "none.sock");
    const missing = new Controller({ socketPath: sock });
    expect(await failure(missing.health())).toMatchObject({
      status: 0,
      code: "daemon_unreachable",
      message: expect.stringContaining(`unix:${sock}`),
    });
    await missing.close();

    const slow = new Controller({ url: `${url}/hang`, requestTimeoutMs: 200 });
    expect(await failure(slow.health())).toMatchObject({ status: 0, code: "timeout", remediation: expect.any(String) });
    const abort = new AbortController();
    const call = slow.getSandbox("x", { signal: abort.signal, timeoutMs: 60_000 });
    abort.abort();
    expect(await failure(call)).toMatchObject({ status: 0, code: "cancelled" });
    await slow.close();
  });
});

describe("the SDK's dependency on the daemon", () => {
  it("is for types only: not a runtime dependency, and no built module imports it", () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(SDK, "package.json"), "utf8")) as { dependencies?: Record<string, string> };
    expect(Object.keys(pkg.dependencies ?? {})).not.toContain("@forkd/daemon");
    const built = fs.readdirSync(path.join(SDK, "dist")).filter((f) => f.endsWith(".js"));
    expect(built).toContain("controller.js");
    for (const file of built) expect(fs.readFileSync(path.join(SDK, "dist", file), "utf8"), file).not.toMatch(/@forkd\/daemon/);
  });
});
