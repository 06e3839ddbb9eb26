import path from "node:path";
import { ForkdError } from "@forkd/core";
import { setting, settingsEnv } from "@forkd/core/settings";
import type { Command } from "commander";

type McpCliOpts = { http?: string; tokenFile?: string; tlsCert?: string; tlsKey?: string };

export function registerMcp(program: Command): void {
  program
    .command("mcp")
    .description(
      "serve forkd's MCP tools on stdio (for MCP clients to spawn), or with --http over streamable HTTP; reaches the daemon at FORKD_URL (with FORKD_TOKEN) or its local socket",
    )
    .option("--http <host:port>", "serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (bearer token required)")
    .option("--token-file <file>", "with --http: the token clients must send (default $FORKD_HOME/token, the daemon's)")
    .option("--tls-cert <file>", "with --http: serve HTTPS with this certificate (required off loopback)")
    .option("--tls-key <file>", "… and this key")
    .action(async (opts: McpCliOpts) => {
      // Loaded here, not at the top: the MCP SDK is only worth its start-up time to this command.
      const mcp = await import("@forkd/mcp");
      // The MCP server reads forkd's client variables from the environment it is given:
      // this process's, with what the CLI's flags decided written in.
      const client = mcp.controllerFromEnv(settingsEnv());
      if (!opts.http) {
        await mcp.runStdio(client);
        // The client hung up: a daemon call still in flight has nobody to answer to.
        process.exit(0);
      }
      let handle: Awaited<ReturnType<typeof mcp.runHttp>>;
      try {
        handle = await mcp.runHttp(
          {
            listen: opts.http,
            tokenFile: opts.tokenFile ?? path.join(setting("home"), "token"),
            ...(opts.tlsCert ? { tlsCert: opts.tlsCert } : {}),
            ...(opts.tlsKey ? { tlsKey: opts.tlsKey } : {}),
          },
          client,
        );
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ? "io_error" : "bad_request";
        throw new ForkdError(code, (err as Error).message);
      }
      process.stderr.write(`forkd mcp: serving ${handle.url}\n`);
      await new Promise<void>((resolve) => {
        process.once("SIGTERM", resolve);
        process.once("SIGINT", resolve);
      });
      await handle.close();
    });
}
