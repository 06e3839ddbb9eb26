import { ForkdError } from "@forkd/core";
import type { Command } from "commander";
import { openBackend, type SnapshotArgs } from "../backend.js";
import { collect, fmtBytes, parseIntOption, plainTable, withSpinner } from "../ui.js";

type SnapshotCliOpts = Omit<SnapshotArgs, "onProgress"> & { json?: boolean; fromSandbox?: string; mode?: string };

export function registerSnapshots(program: Command): void {
  program
    .command("snapshot")
    .description("boot a parent, warm it up, and save it as a snapshot that children fork from copy-on-write")
    .requiredOption("--tag <tag>", "name of the snapshot")
    .option("--image <name>", "guest image", "base")
    .option("--warm <cmd>", "shell command to run before the snapshot (repeatable)", collect, [])
    .option("--warm-eval <code>", "JavaScript to evaluate in the warm context before the snapshot (repeatable)", collect, [])
    .option("--memory-mib <n>", "guest memory in MiB", parseIntOption("--memory-mib"), 256)
    .option("--vcpus <n>", "virtual CPUs", parseIntOption("--vcpus"), 1)
    .option("--json", "print the snapshot as JSON")
    .option("--from-sandbox <id>", "BRANCH this running sandbox instead of booting a parent (same as `forkd branch`)")
    .option("--mode <mode>", "with --from-sandbox: full, diff or live")
    .option("--live", "with --from-sandbox: mode live (forkd's flag)")
    .option("--diff", "with --from-sandbox: mode diff (forkd's flag)")
    .option("--no-wait", "with --from-sandbox: answer once the source runs again (needs the daemon)")
    .action(async (opts: SnapshotCliOpts & { live?: boolean; diff?: boolean; wait: boolean }) => {
      const backend = await openBackend();
      if (opts.fromSandbox) {
        if ([opts.mode, opts.live, opts.diff].filter(Boolean).length > 1) {
          throw new ForkdError("bad_request", "choose one of --mode, --live and --diff");
        }
        const mode = opts.mode ?? (opts.live ? "live" : opts.diff ? "diff" : undefined);
        await runBranch(opts.fromSandbox, { tag: opts.tag, ...(mode ? { mode } : {}), wait: opts.wait, json: opts.json });
        return;
      }
      if (opts.live || opts.diff || !opts.wait) {
        throw new ForkdError("bad_request", "--live, --diff and --no-wait go with --from-sandbox ID");
      }
      const started = performance.now();
      const snapshot = await withSpinner(
        `snapshot ${opts.tag}`,
        (s) => backend.createSnapshot({ ...opts, onProgress: (step) => (s.text = `snapshot ${opts.tag}: ${step}`) }),
        (snap) =>
          `snapshot ${snap.tag} ready in ${((performance.now() - started) / 1000).toFixed(2)} s (device state ${fmtBytes(snap.vmstate_bytes)})`,
      );
      if (opts.json) process.stdout.write(`${JSON.stringify(snapshot, null, 2)}\n`);
      else if (!process.stderr.isTTY) process.stdout.write(`${snapshot.tag}\n`);
    });

  program
    .command("branch")
    .description("BRANCH a running sandbox: pause it briefly, capture memory, processes and files as a new snapshot, resume it")
    .argument("<id>")
    .option("--tag <tag>", "name of the new snapshot (default: <parent>-branch-<time>)")
    .option("--mode <mode>", "live (default where possible), diff or full")
    .option("--no-wait", "return as soon as the source runs again; the snapshot shows as writing until ready (needs the daemon)")
    .option("--json", "print the result as JSON")
    .action((id: string, opts: { tag?: string; mode?: string; wait: boolean; json?: boolean }) => runBranch(id, opts));

  program
    .command("images")
    .description("list snapshots: tag, sizes, created, parent, whether staged on shmem")
    .option("--json", "machine-readable output")
    .action(async (opts: { json?: boolean }) => {
      const snapshots = await (await openBackend()).listSnapshots();
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(snapshots, null, 2)}\n`);
        return;
      }
      if (snapshots.length === 0) {
        process.stdout.write("no snapshots; create one with `forkd snapshot --tag NAME`\n");
        return;
      }
      const table = plainTable(["TAG", "IMAGE", "LOGICAL", "PHYSICAL", "STORAGE", "VMSTATE", "STAGED", "PARENT", "CREATED"]);
      for (const s of snapshots) {
        table.push([
          s.tag,
          s.image ?? "-",
          fmtBytes(s.memory_bytes),
          fmtBytes(s.physical_bytes),
          s.storage === "diff" ? `diff on ${s.parent}` : "full",
          fmtBytes(s.vmstate_bytes),
          s.staged ? "yes" : "no",
          s.branched_from ?? s.parent ?? "-",
          s.created_at ?? "-",
        ]);
      }
      process.stdout.write(`${table.toString()}\n`);
    });

  program
    .command("rmi")
    .description("remove snapshots (refused while children are alive or other snapshots are layers on one, unless --force / --cascade)")
    .argument("<tags...>")
    .option("--force", "kill their live children first")
    .option("--cascade", "also remove the snapshots stored as layers on them")
    .action(async (tags: string[], opts: { force?: boolean; cascade?: boolean }) => {
      const backend = await openBackend();
      for (const tag of tags) {
        await backend.removeSnapshot(tag, { force: opts.force === true, cascade: opts.cascade === true });
        process.stdout.write(`removed ${tag}\n`);
      }
    });

  program
    .command("snapshot-info")
    .description("a snapshot's chain: depth, ancestors, dependents, and the bytes each layer stores")
    .argument("<tag>")
    .option("--json", "machine-readable output")
    .action(async (tag: string, opts: { json?: boolean }) => {
      const info = await (await openBackend()).snapshotInfo(tag);
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(info, null, 2)}\n`);
        return;
      }
      process.stdout.write(
        `${info.tag}: depth ${info.depth}, logical ${fmtBytes(info.logical_bytes)}, physical ${fmtBytes(info.physical_bytes)}\n` +
          `ancestors: ${info.ancestors.join(" → ") || "none"}\ndependents: ${info.dependents.join(", ") || "none"}\n`,
      );
      const table = plainTable(["LAYER", "KIND", "PHYSICAL", "CHANGED PAGES"]);
      for (const l of info.layers) table.push([l.tag, l.kind, fmtBytes(l.physical_bytes), l.changed_pages ?? "-"]);
      process.stdout.write(`${table.toString()}\n`);
    });

  program
    .command("snapshot-compact")
    .description("forkd's name for compact: write a standalone copy of --from under --to")
    .requiredOption("--from <tag>", "snapshot to copy")
    .requiredOption("--to <tag>", "tag of the copy")
    .action(async (opts: { from: string; to: string }) => {
      const snap = await withSpinner(`compacting ${opts.from} into ${opts.to}`, async () =>
        (await openBackend()).compactSnapshot(opts.from, opts.to),
      );
      process.stdout.write(`${snap.tag}\n`);
    });

  program
    .command("compact")
    .description("write a standalone copy of a snapshot (whole memory, no parent) under a new tag")
    .argument("<tag>")
    .requiredOption("--to <tag>", "tag of the copy")
    .action(async (tag: string, opts: { to: string }) => {
      const snap = await withSpinner(
        `compacting ${tag} into ${opts.to}`,
        async () => (await openBackend()).compactSnapshot(tag, opts.to),
        (s) => `${s.tag}: ${fmtBytes(s.physical_bytes)} standalone`,
      );
      if (!process.stderr.isTTY) process.stdout.write(`${snap.tag}\n`);
    });
}

async function runBranch(id: string, opts: { tag?: string; mode?: string; wait: boolean; json?: boolean }): Promise<void> {
  const backend = await openBackend();
  const result = await withSpinner(
    `branching ${id}`,
    () => backend.branch(id, opts),
    (r) =>
      `${r.tag}: ${r.mode} BRANCH of ${r.branched_from}, source paused ${(r.pause_ms ?? Number.NaN).toFixed(1)} ms, ${r.status}${r.total_ms ? ` in ${(r.total_ms / 1000).toFixed(2)} s` : ""}`,
  );
  if (opts.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else if (!process.stderr.isTTY)
    process.stdout.write(`${result.tag} ${result.status} pause_ms=${(result.pause_ms ?? Number.NaN).toFixed(1)}\n`);
}
