// The MCP server over streamable HTTP, for clients that cannot spawn a process.
// It drives sandboxes with the daemon's authority, so it asks for the daemon's own
// bearer token, and refuses to listen off loopback without TLS (the token would
// cross the network in clear).
import { createHash, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import path from "node:path";
import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { processEnvironment } from "./environment.js";

const MCP_PATH = "/mcp";
/** A write_file of the agent's largest file (8 MiB) in base64, with room for the JSON around it. */
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const MIN_TOKEN_BYTES = 16;

export type McpHttpOpts = {
  host: string;
  port: number;
  token: string;
  tls?: { cert: string; key: string };
  /** A fresh server per request: the transport is stateless, so no session outlives its request. */
  createServer: () => McpServer;
};

export type McpHttpHandle = { url: string; close: () => Promise<void> };

function isLoopbackHost(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** HOST:PORT, [v6]:PORT or a bare port (loopback). */
export function parseListen(value: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(/^\d+$/.test(value) ? `127.0.0.1:${value}` : value);
  const port = Number(m?.[3]);
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--http takes HOST:PORT (e.g. 127.0.0.1:8890), got '${value}'`);
  }
  return { host: (m[1] ?? m[2])!, port };
}

/** A token file others could read: refused as it is, not reported as unreadable. */
class UnsafeTokenFile extends Error {}

/** The daemon's token: --token-file, else $FORKD_HOME/token (which `forkd daemon` writes). */
export function readToken(file?: string, env: NodeJS.ProcessEnv = processEnvironment()): string {
  const source = file ?? path.join(env.FORKD_HOME ?? "/var/lib/forkd", "token");
  let token: string;
  let fd: number | undefined;
  try {
    fd = fs.openSync(source, "r");
    // The daemon's own rule (daemon/src/auth.ts), on the open descriptor so what is checked is what is read.
    const mode = fs.fstatSync(fd).mode;
    if ((mode & 0o077) !== 0) {
      throw new UnsafeTokenFile(
        `the token file ${source} has mode ${(mode & 0o777).toString(8).padStart(4, "0")}: group or others can read or change it, so anyone on this host could use the daemon's token; run: chmod 600 ${source}`,
      );
    }
    token = fs.readFileSync(fd, "utf8").trim();
  } catch (err) {
    if (err instanceof UnsafeTokenFile) throw err;
    throw new Error(
      `cannot read the bearer token from ${source}: ${(err as Error).message}; start \`forkd daemon\` once (it writes one) or pass --token-file`,
    );
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
  if (Buffer.byteLength(token) < MIN_TOKEN_BYTES) throw new Error(`the token in ${source} is shorter than ${MIN_TOKEN_BYTES} bytes`);
  return token;
}

/** Digests first, so the comparison's time does not tell a guesser the token's length either. */
function tokenMatches(expected: string, header: string | undefined): boolean {
  const presented = header ? /^Bearer\s+(\S+)\s*$/i.exec(header)?.[1] : undefined;
  if (presented === undefined) return false;
  const a = createHash("sha256").update(expected).digest();
  const b = createHash("sha256").update(presented).digest();
  return timingSafeEqual(a, b);
}

function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { "content-type": "application/json", ...headers }).end(JSON.stringify(body));
}

function jsonRpcError(res: http.ServerResponse, status: number, code: number, message: string): void {
  sendJson(res, status, { jsonrpc: "2.0", error: { code, message }, id: null });
}

async function readBody(req: http.IncomingMessage): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) return undefined;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

export async function serveHttp(opts: McpHttpOpts): Promise<McpHttpHandle> {
  if (!isLoopbackHost(opts.host) && !opts.tls) {
    throw new Error(
      `refusing to serve MCP on ${opts.host} without TLS: the bearer token would cross the network in clear; pass --tls-cert and --tls-key, or listen on 127.0.0.1`,
    );
  }
  if (Buffer.byteLength(opts.token) < MIN_TOKEN_BYTES) throw new Error(`the bearer token is shorter than ${MIN_TOKEN_BYTES} bytes`);

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse) => {
    const url = new URL(req.url ?? "/", "http://mcp");
    if (url.pathname !== MCP_PATH) {
      sendJson(res, 404, { error: `no such path; the MCP endpoint is ${MCP_PATH}`, code: "not_found" });
      return;
    }
    // Auth before anything else is read, so an unauthenticated client costs no body parsing.
    if (!tokenMatches(opts.token, req.headers.authorization)) {
      sendJson(
        res,
        401,
        {
          error: "missing or wrong bearer token",
          code: "unauthorized",
          remediation: "send Authorization: Bearer <token>, the forkd daemon's token ($FORKD_HOME/token or the --token-file it was given)",
        },
        { "www-authenticate": 'Bearer realm="forkd-mcp"' },
      );
      return;
    }
    if (req.method !== "POST") {
      // Stateless: no session to stream server-initiated messages to, or to delete.
      jsonRpcError(res, 405, -32000, "only POST is served: this server is stateless");
      return;
    }
    const raw = await readBody(req);
    if (raw === undefined) {
      jsonRpcError(res, 413, -32600, `request body over ${MAX_BODY_BYTES} bytes`);
      return;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw.toString("utf8"));
    } catch {
      jsonRpcError(res, 400, -32700, "parse error: the body is not JSON");
      return;
    }
    const server = opts.createServer();
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    res.on("close", () => {
      // The answer is gone already: a close that fails can only be reported here.
      const reportClose = (err: Error) => process.stderr.write(`forkd mcp: closing a request's MCP session failed: ${err.message}\n`);
      transport.close().catch(reportClose);
      server.close().catch(reportClose);
    });
    await server.connect(transport);
    await transport.handleRequest(req, res, parsed);
  };

  const listener = (req: http.IncomingMessage, res: http.ServerResponse) => {
    handle(req, res).catch((err: Error) => {
      if (!res.headersSent) jsonRpcError(res, 500, -32603, `internal error: ${err.message}`);
      else res.destroy();
    });
  };
  const server = opts.tls
    ? https.createServer({ cert: fs.readFileSync(opts.tls.cert), key: fs.readFileSync(opts.tls.key) }, listener)
    : http.createServer(listener);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  return {
    url: `${opts.tls ? "https" : "http"}://${host}:${addr.port}${MCP_PATH}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
