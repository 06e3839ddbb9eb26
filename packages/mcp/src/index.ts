// The forkd MCP server: forkd's tools over stdio (what MCP clients spawn) or
// streamable HTTP, talking to the daemon through its REST API.
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { DaemonClient } from "./client.js";
import { type McpHttpHandle, parseListen, readToken, serveHttp } from "./http.js";
import { createForkdMcpServer } from "./server.js";

export { DaemonClient, DaemonError, errorFromBody, resolveTarget } from "./client.js";
export { isLoopbackHost, MCP_PATH, type McpHttpHandle, parseListen, readToken, serveHttp } from "./http.js";
export { createForkdMcpServer, errorResult, SERVER_NAME, SERVER_VERSION, toolResult } from "./server.js";

/** Serve on stdin/stdout until the client closes it; stdout carries only protocol messages. */
export async function runStdio(client: DaemonClient = DaemonClient.fromEnv()): Promise<void> {
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

export async function runHttp(opts: HttpCliOpts, client: DaemonClient = DaemonClient.fromEnv()): Promise<McpHttpHandle> {
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
