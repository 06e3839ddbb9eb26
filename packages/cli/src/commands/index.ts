// Which module registers each top-level command. The CLI loads only the module its
// command line names: importing every command (and with them core, the daemon, the
// MCP server and the SDK) cost about half a second before `forkd --version` printed.
// Help, and any name not in this table, load them all, so a command a module adds
// without a line here still works (slower to start); a unit test keeps the table true.
import type { Command } from "commander";

type Register = (program: Command) => void;
export type CommandModule = { commands: readonly string[]; load: () => Promise<Register> };

/** In the order `forkd --help` lists them. */
export const COMMAND_MODULES: readonly CommandModule[] = [
  { commands: ["run"], load: async () => (await import("./run.js")).registerRun },
  {
    commands: ["snapshot", "branch", "images", "rmi", "snapshot-info", "snapshot-compact", "compact"],
    load: async () => (await import("./snapshots.js")).registerSnapshots,
  },
  { commands: ["pack", "unpack"], load: async () => (await import("./packs.js")).registerPacks },
  { commands: ["push", "pull"], load: async () => (await import("./registry.js")).registerRegistry },
  {
    commands: ["ping", "where", "spawn", "fork", "ls", "exec", "eval", "files", "kill", "cleanup"],
    load: async () => (await import("./sandboxes.js")).registerSandboxes,
  },
  { commands: ["pool"], load: async () => (await import("./pool.js")).registerPool },
  { commands: ["workspace"], load: async () => (await import("./workspaces.js")).registerWorkspaces },
  { commands: ["image"], load: async () => (await import("./image.js")).registerImage },
  { commands: ["recipe"], load: async () => (await import("./recipe.js")).registerRecipe },
  { commands: ["doctor"], load: async () => (await import("./doctor.js")).registerDoctor },
  { commands: ["daemon"], load: async () => (await import("./daemon.js")).registerDaemon },
  { commands: ["cluster"], load: async () => (await import("./cluster.js")).registerCluster },
  { commands: ["ui"], load: async () => (await import("./dashboard.js")).registerDashboard },
  { commands: ["mcp"], load: async () => (await import("./mcp.js")).registerMcp },
  { commands: ["e2b"], load: async () => (await import("./e2b.js")).registerE2b },
  { commands: ["bench"], load: async () => (await import("./bench/index.js")).registerBench },
  { commands: ["quickstart"], load: async () => (await import("./quickstart.js")).registerQuickstart },
];

/** Global options that take a value (the value is not a command name). */
const GLOBAL_OPTIONS_WITH_VALUE = new Set(["--daemon-url", "--daemon-token"]);

/** The modules a command line needs: none for --version, the named command's, or all. */
export function modulesFor(args: readonly string[]): readonly CommandModule[] {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "-V" || arg === "--version") return [];
    if (GLOBAL_OPTIONS_WITH_VALUE.has(arg)) {
      i++;
      continue;
    }
    if (arg.startsWith("--daemon-url=") || arg.startsWith("--daemon-token=")) continue;
    // Help, `--`, an option commander will refuse: let it see every command.
    if (arg.startsWith("-")) return COMMAND_MODULES;
    const named = COMMAND_MODULES.find((m) => m.commands.includes(arg));
    return named ? [named] : COMMAND_MODULES;
  }
  return COMMAND_MODULES;
}
