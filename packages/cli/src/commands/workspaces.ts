// forkd workspace: named sandboxes suspended to disk and resumed (forkd's commands and flags).
import type { Command } from "commander";
import { type ApiWorkspace, openBackend } from "../backend.js";
import { parseIntOption, plainTable, withSpinner } from "../ui.js";

function show(w: ApiWorkspace, json?: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(w, null, 2)}\n`);
    return;
  }
  process.stdout.write(
    `${w.name}: ${w.status}${w.live_sandbox_id ? ` (sandbox ${w.live_sandbox_id})` : ""}, from ${w.current_state_tag ?? w.source_snapshot_tag}\n`,
  );
}

export function registerWorkspaces(program: Command): void {
  const ws = program.command("workspace").description("named, long-lived sandboxes: suspend to disk, resume later (survive restarts)");
  ws.command("create")
    .argument("<name>")
    .requiredOption("--snapshot <tag>", "snapshot to start from")
    .option("--per-child-netns", "accepted for forkd's scripts: every sandbox here has a private network")
    .option("--memory-limit-mib <m>", "cap its host memory with a cgroup", parseIntOption("--memory-limit-mib"))
    .option("--json", "print the workspace as JSON")
    .action(async (name: string, opts: { snapshot: string; memoryLimitMib?: number; json?: boolean }) => {
      const backend = await openBackend();
      show(
        await withSpinner(`creating workspace ${name}`, () => backend.workspaces.create(name, opts.snapshot, opts.memoryLimitMib)),
        opts.json,
      );
    });
  ws.command("suspend")
    .argument("<name>")
    .option("--diff", "capture with a pre-copy (diff) BRANCH")
    .option("--json", "print the workspace as JSON")
    .action(async (name: string, opts: { diff?: boolean; json?: boolean }) => {
      const backend = await openBackend();
      show(await withSpinner(`suspending ${name}`, () => backend.workspaces.suspend(name, opts.diff === true)), opts.json);
    });
  ws.command("resume")
    .argument("<name>")
    .option("--json", "print the workspace as JSON")
    .action(async (name: string, opts: { json?: boolean }) => {
      const backend = await openBackend();
      show(await withSpinner(`resuming ${name}`, () => backend.workspaces.resume(name)), opts.json);
    });
  ws.command("list")
    .alias("ls")
    .option("--json", "machine-readable output")
    .action(async (opts: { json?: boolean }) => {
      const list = await (await openBackend()).workspaces.list();
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
        return;
      }
      const table = plainTable(["NAME", "STATUS", "SANDBOX", "STATE", "SOURCE"]);
      for (const w of list) table.push([w.name, w.status, w.live_sandbox_id ?? "-", w.current_state_tag ?? "-", w.source_snapshot_tag]);
      process.stdout.write(`${table.toString()}\n`);
    });
  ws.command("delete")
    .alias("rm")
    .argument("<name>")
    .action(async (name: string) => {
      await (await openBackend()).workspaces.remove(name);
      process.stdout.write(`deleted ${name}\n`);
    });
}
