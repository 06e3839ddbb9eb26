import type { Command } from "commander";
import { openBackend } from "../backend.js";
import { collect, fmtBytes, parseIntOption, plainTable, withSpinner } from "../ui.js";

type SnapshotCliOpts = { tag: string; image: string; warm: string[]; warmEval: string[]; memoryMib: number; vcpus: number; json?: boolean };

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
    .action(async (opts: SnapshotCliOpts) => {
      const backend = await openBackend();
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
      const table = plainTable(["TAG", "IMAGE", "MEMORY", "RESIDENT", "VMSTATE", "STAGED", "PARENT", "CREATED"]);
      for (const s of snapshots) {
        table.push([
          s.tag,
          s.image,
          `${s.memory_mib} MiB`,
          fmtBytes(s.resident_bytes),
          fmtBytes(s.vmstate_bytes),
          s.staged ? "yes" : "no",
          s.branched_from ?? s.parent ?? "-",
          s.created_at,
        ]);
      }
      process.stdout.write(`${table.toString()}\n`);
    });

  program
    .command("rmi")
    .description("remove a snapshot (refused while children of it are alive, unless --force kills them)")
    .argument("<tag>")
    .option("--force", "kill its live children first")
    .action(async (tag: string, opts: { force?: boolean }) => {
      await (await openBackend()).removeSnapshot(tag, opts.force === true);
      process.stdout.write(`removed ${tag}\n`);
    });
}
