// pack / unpack: one self-contained .forkd.tar.zst per snapshot chain, on this host.
import path from "node:path";
import { packSnapshot, unpackFile } from "@forkd/core";
import type { Command } from "commander";
import { byteBar } from "../progress.js";
import { fmtBytes } from "../ui.js";

export function registerPacks(program: Command): void {
  program
    .command("pack")
    .description("write a snapshot and everything it needs (kernel, initrd, root image, every ancestor layer) into one .forkd.tar.zst")
    .argument("<tag>")
    .requiredOption("-o, --output <file>", "the pack to write (conventionally NAME.forkd.tar.zst)")
    .option("--json", "print the pack's index as JSON")
    .action(async (tag: string, opts: { output: string; json?: boolean }) => {
      const bar = byteBar(`pack ${tag}`);
      let index: Awaited<ReturnType<typeof packSnapshot>>;
      try {
        index = await packSnapshot(tag, path.resolve(opts.output), (done, total, step) => bar.update(done, total, step));
      } finally {
        bar.stop();
      }
      if (opts.json) process.stdout.write(`${JSON.stringify(index, null, 2)}\n`);
      else {
        const logical = index.files.reduce((sum, f) => sum + f.size, 0);
        process.stdout.write(
          `${opts.output}: ${index.snapshots.join(" → ")}, ${fmtBytes(index.pack_bytes)} (from ${fmtBytes(logical)} of files)\n`,
        );
      }
    });

  program
    .command("unpack")
    .description("verify a .forkd.tar.zst (format, every digest, member names and sizes) and register what it holds")
    .argument("<file>")
    .option("--tag <tag>", "register the head snapshot under this tag")
    .option("--json", "print what was registered as JSON")
    .action(async (file: string, opts: { tag?: string; json?: boolean }) => {
      const bar = byteBar(`unpack ${path.basename(file)}`);
      let result: Awaited<ReturnType<typeof unpackFile>>;
      try {
        result = await unpackFile(path.resolve(file), {
          ...(opts.tag ? { tag: opts.tag } : {}),
          onProgress: (d, t, s) => bar.update(d, t, s),
        });
      } finally {
        bar.stop();
      }
      if (opts.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      else {
        process.stdout.write(
          `${result.tag} ready: registered ${result.registered.join(", ") || "nothing new"}${result.reused.length ? `; already here: ${result.reused.join(", ")}` : ""}\n`,
        );
      }
    });
}
