// `forkd e2b env`: what unmodified E2B SDK code needs to use this daemon, as sh
// export lines (eval "$(forkd e2b env)") or JSON. The key is derived from the
// daemon's token, so the daemon hands it only to whoever already holds the token
// (or the root-only unix socket).
import fs from "node:fs";
import { ForkdError } from "@forkd/core";
import { clientSocketPath, setting } from "@forkd/core/settings";
import type { Command } from "commander";
import { configuredController, viaApi } from "../backend-daemon.js";

/** The variables E2B's JS and Python SDKs read. E2B_DEBUG stays unset: in debug mode the SDK skips kill and metrics. */
type E2bEnvLines = { E2B_API_URL: string; E2B_SANDBOX_URL: string; E2B_API_KEY: string };

/** A value for a POSIX sh `export`: single-quoted, so nothing in it is expanded. */
function shQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

function e2bEnvText(env: E2bEnvLines): string {
  return `export ${Object.entries(env)
    .map(([k, v]) => `${k}=${shQuote(v)}`)
    .join(" ")}\n`;
}

export async function e2bEnv(): Promise<E2bEnvLines> {
  const explicit = setting("url");
  if (!explicit && !fs.existsSync(clientSocketPath())) {
    throw new ForkdError(
      "not_supported",
      "no forkd daemon answers on the local socket; start `forkd daemon` (or set FORKD_URL and FORKD_TOKEN)",
    );
  }
  const controller = configuredController();
  try {
    const env = await viaApi(() => controller.e2bEnv());
    // Through FORKD_URL the client's own address for the daemon is the one that works from here.
    const url = explicit && /^https?:\/\//.test(explicit) ? explicit.replace(/\/+$/, "") : env.api_url;
    if (!url) {
      throw new ForkdError(
        "not_supported",
        "the daemon listens on no TCP port (--listen none), and E2B's SDKs speak HTTP over TCP only; restart it with --listen HOST:PORT",
      );
    }
    return { E2B_API_URL: url, E2B_SANDBOX_URL: url, E2B_API_KEY: env.api_key };
  } finally {
    await controller.close();
  }
}

export function registerE2b(program: Command): void {
  const e2b = program.command("e2b").description("E2B's SDKs against this daemon (its port serves E2B's API and envd)");
  e2b
    .command("env")
    .description('print E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY for unmodified E2B code: eval "$(forkd e2b env)"')
    .option("--json", "as JSON")
    .action(async (opts: { json?: boolean }) => {
      const env = await e2bEnv();
      process.stdout.write(opts.json ? `${JSON.stringify(env, null, 2)}\n` : e2bEnvText(env));
    });
}
