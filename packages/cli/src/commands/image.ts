import { buildImage, listImages, pruneImages } from "@forkd/core";
import type { Command } from "commander";
import { fmtBytes, fmtMs, plainTable, withSpinner } from "../ui.js";

export function registerImage(program: Command): void {
  const image = program.command("image").description("build and list guest images");
  image
    .command("build")
    .description("build a guest image (cached: rebuilt only when an input changes)")
    .option("--name <name>", "image name", "base")
    .option("--force", "rebuild even if the cache is current")
    .option("--packages <list>", "extra Debian packages, comma-separated (debootstrapped images such as python)")
    .option("--from-dir <dir>", "turn this root filesystem tree into an image")
    .option("--from-tar <file>", "turn this root filesystem tarball (for example a `docker export`) into an image")
    .action(async (opts: { name: string; force?: boolean; packages?: string; fromDir?: string; fromTar?: string }) => {
      const started = performance.now();
      const { manifest, cached } = await withSpinner(
        `building image '${opts.name}'`,
        (s) =>
          buildImage({
            name: opts.name,
            force: opts.force,
            packages: opts.packages ? opts.packages.split(",").filter(Boolean) : undefined,
            fromDir: opts.fromDir,
            fromTar: opts.fromTar,
            onProgress: (step) => (s.text = `image '${opts.name}': ${step}`),
          }),
        (r) =>
          `image '${r.manifest.name}' ${r.cached ? "is up to date" : "built"} (${r.manifest.digest.slice(0, 12)}, kernel ${r.manifest.kernelVersion}) in ${fmtMs(performance.now() - started)}`,
      );
      if (!process.stderr.isTTY) {
        process.stdout.write(
          `image ${manifest.name} ${cached ? "cached" : "built"} ${manifest.digest.slice(0, 12)} kernel ${manifest.kernelVersion}\n`,
        );
      }
    });
  image
    .command("ls")
    .description("list guest images")
    .option("--json", "machine-readable output")
    .action(async (opts: { json?: boolean }) => {
      const images = await listImages();
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(images, null, 2)}\n`);
        return;
      }
      const table = plainTable(["NAME", "DIGEST", "KERNEL", "ROOTFS", "RUNTIMES", "CREATED"]);
      for (const m of images) {
        table.push([m.name, m.digest.slice(0, 12), m.kernelVersion, fmtBytes(m.rootfsBytes), m.runtimes.join(","), m.createdAt]);
      }
      process.stdout.write(images.length ? `${table.toString()}\n` : "no images; build one with `forkd image build`\n");
    });
  image
    .command("prune")
    .description("remove image builds that are neither current nor used by a snapshot")
    .option("--json", "machine-readable output")
    .action(async (opts: { json?: boolean }) => {
      const report = await pruneImages();
      if (opts.json) process.stdout.write(`${JSON.stringify(report)}\n`);
      else {
        process.stdout.write(
          `removed ${report.removed.length} unused build(s)${report.removed.length ? `: ${report.removed.join(", ")}` : ""}; kept ${report.keptForSnapshots.length} that snapshots use\n`,
        );
      }
    });
}
