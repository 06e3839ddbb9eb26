#!/usr/bin/env node
import { configureSettings, settings } from "@forkd/core/settings";
import { Command, CommanderError } from "commander";
import { modulesFor } from "./commands/index.js";
import { reportError } from "./ui.js";

const program = new Command()
  .name("forkd")
  .description("microVM sandboxes: warm snapshots, copy-on-write fork, BRANCH")
  .version("0.1.0")
  .option("--daemon-url <url>", "the daemon to use: http(s)://HOST:PORT or unix:/path (env FORKD_URL)")
  .option("--daemon-token <token>", "its bearer token (env FORKD_TOKEN; the unix socket needs none)")
  .exitOverride()
  .showHelpAfterError()
  .hook("preAction", (command) => {
    // forkd's flags: the same as FORKD_URL / FORKD_TOKEN for everything that reaches the daemon.
    const { daemonUrl, daemonToken } = command.optsWithGlobals() as { daemonUrl?: string; daemonToken?: string };
    configureSettings({ ...(daemonUrl ? { url: daemonUrl } : {}), ...(daemonToken ? { token: daemonToken } : {}) });
    // Every setting checked before the command does anything: a bad variable is named here.
    settings();
  });

try {
  // Only the module the command line names is loaded (all of them for help).
  for (const register of await Promise.all(modulesFor(process.argv.slice(2)).map((m) => m.load()))) register(program);
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exitCode = err.exitCode === 0 ? 0 : 2;
  } else {
    process.exitCode = reportError(err);
  }
}
