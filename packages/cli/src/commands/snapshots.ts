import { createSnapshot, listSnapshots, parseAccel, removeSnapshot } from "@forkd/core";
import type { Command } from "commander";
import { collect, fmtBytes, fmtMs, parseIntOption, plainTable, withSpinner } from "../ui.js";

type SnapshotCliOpts = {
  tag: string;
  image: string;
  warm: string[];
  warmEval: string[];
  memoryMib: number;
  vcpus: number;
  accel?: string;
  json?: boolean;
};

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
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print the manifest as JSON")
    .action(async (opts: SnapshotCliOpts) => {
      const snapshot = await withSpinner(
        `snapshot ${opts.tag}`,
        (s) =>
          createSnapshot({
            tag: opts.tag,
            image: opts.image,
            warm: opts.warm,
            warmEval: opts.warmEval,
            memoryMib: opts.memoryMib,
            vcpus: opts.vcpus,
            accel: opts.accel ? parseAccel(opts.accel) : undefined,
            onProgress: (step) => (s.text = `snapshot ${opts.tag}: ${step}`),
          }),
        (snap) =>
          `snapshot ${snap.tag}: boot ${fmtMs(snap.timings.bootMs)}, warm-up ${fmtMs(snap.timings.warmMs)}, device state saved in ${fmtMs(snap.timings.saveMs)} (${fmtBytes(snap.sizes.vmstateBytes)}), total ${fmtMs(snap.timings.totalMs)}`,
      );
      if (opts.json) process.stdout.write(`${JSON.stringify(snapshot, null, 2)}\n`);
      else if (!process.stderr.isTTY) process.stdout.write(`${snapshot.tag}\n`);
    });

  program
    .command("images")
    .description("list snapshots: tag, sizes, created, parent, whether staged on shmem")
    .option("--json", "machine-readable output")
    .action(async (opts: { json?: boolean }) => {
      const snapshots = await listSnapshots();
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
          s.image.name,
          `${s.memoryMib} MiB`,
          fmtBytes(s.sizes.memoryAllocatedBytes),
          fmtBytes(s.sizes.vmstateBytes),
          s.staged ? "yes" : "no",
          s.branchedFrom ?? s.parent ?? "-",
          s.createdAt,
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
      const { killed } = await removeSnapshot(tag, { force: opts.force });
      process.stdout.write(`removed ${tag}${killed.length ? ` (killed ${killed.join(", ")})` : ""}\n`);
    });
}
