// The forkd MCP server: forkd's tools over stdio (what MCP clients spawn) or
// streamable HTTP, talking to the daemon through its REST API with the SDK's Controller.
import { Controller } from "@forkd/sdk";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { processEnvironment } from "./environment.js";
import { type McpHttpHandle, parseListen, readToken, serveHttp } from "./http.js";
import { createForkdMcpServer } from "./server.js";

export { type McpHttpHandle, parseListen, readToken } from "./http.js";
export { errorResult, toolResult } from "./server.js";

/** A short call's deadline: FORKD_HTTP_TIMEOUT seconds, as forkd's MCP server reads it; 60 by default. */
const DEFAULT_TIMEOUT_MS = 60_000;

/** The daemon as forkd's clients find it (FORKD_URL / FORKD_TOKEN, else the local socket), with the MCP server's timeout. */
export function controllerFromEnv(env: NodeJS.ProcessEnv = processEnvironment()): Controller {
  const secs = Number(env.FORKD_HTTP_TIMEOUT);
  return Controller.fromEnv(env, { requestTimeoutMs: Number.isFinite(secs) && secs > 0 ? secs * 1000 : DEFAULT_TIMEOUT_MS });
}

/** Serve on stdin/stdout until the client closes it; stdout carries only protocol messages. */
export async function runStdio(client: Controller = controllerFromEnv()): Promise<void> {
  const server = createForkdMcpServer({ client });
  const transport = new StdioServerTransport();
  const closed = new Promise<void>((resolve) => {
    transport.onclose = () => resolve();
    process.stdin.once("end", () => resolve());
  });
  await server.connect(transport);
  await closed;
  await server.close();
  await client.close();
}

export type HttpCliOpts = { listen: string; tokenFile?: string; tlsCert?: string; tlsKey?: string };

export async function runHttp(opts: HttpCliOpts, client: Controller = controllerFromEnv()): Promise<McpHttpHandle> {
  if (Boolean(opts.tlsCert) !== Boolean(opts.tlsKey)) throw new Error("--tls-cert and --tls-key go together");
  const { host, port } = parseListen(opts.listen);
  return serveHttp({
    host,
    port,
    token: readToken(opts.tokenFile),
    ...(opts.tlsCert && opts.tlsKey ? { tls: { cert: opts.tlsCert, key: opts.tlsKey } } : {}),
    createServer: () => createForkdMcpServer({ client }),
  });
}
