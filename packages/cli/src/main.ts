#!/usr/bin/env node
import { Command, CommanderError } from "commander";
import { registerBench } from "./commands/bench/index.js";
import { registerDaemon } from "./commands/daemon.js";
import { registerDoctor } from "./commands/doctor.js";
import { registerImage } from "./commands/image.js";
import { registerMcp } from "./commands/mcp.js";
import { registerPacks } from "./commands/packs.js";
import { registerPool } from "./commands/pool.js";
import { registerQuickstart } from "./commands/quickstart.js";
import { registerRegistry } from "./commands/registry.js";
import { registerRun } from "./commands/run.js";
import { registerSandboxes } from "./commands/sandboxes.js";
import { registerSnapshots } from "./commands/snapshots.js";
import { registerWorkspaces } from "./commands/workspaces.js";
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
    if (daemonUrl) process.env.FORKD_URL = daemonUrl;
    if (daemonToken) process.env.FORKD_TOKEN = daemonToken;
  });

registerRun(program);
registerSnapshots(program);
registerPacks(program);
registerRegistry(program);
registerSandboxes(program);
registerPool(program);
registerWorkspaces(program);
registerImage(program);
registerDoctor(program);
registerDaemon(program);
registerMcp(program);
registerBench(program);
registerQuickstart(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exitCode = err.exitCode === 0 ? 0 : 2;
  } else {
    process.exitCode = reportError(err);
  }
}
