import { buildImage, chooseAccel, Vm } from "@forkd/core";
import type { Command } from "commander";
import { fmtMs, withSpinner } from "../ui.js";

export function registerQuickstart(program: Command): void {
  program
    .command("quickstart")
    .description("build the base image if needed, boot a VM, run a command and some JavaScript in it, print timings")
    .action(async () => {
      const choice = await chooseAccel();
      process.stdout.write(`accel: ${choice.accel} (${choice.reason})\n`);
      const built = await withSpinner(
        "building the base image",
        (s) => buildImage({ name: "base", onProgress: (step) => (s.text = `base image: ${step}`) }),
        (r) => `base image ${r.cached ? "up to date" : "built"} (${r.manifest.digest.slice(0, 12)})`,
      );
      const { vm, timings } = await withSpinner(
        "booting a VM",
        () => Vm.boot({ image: built.manifest.name, ephemeral: true }),
        (r) => `VM ${r.vm.id} booted in ${fmtMs(r.timings.totalMs)}`,
      );
      try {
        let out = "";
        const t0 = performance.now();
        const result = await vm.agent.exec({ argv: ["uname", "-a"] }, { onStdout: (d) => (out += d.toString()) });
        const execMs = performance.now() - t0;
        const t1 = performance.now();
        const evaluated = await vm.agent.eval("globalThis.n = (globalThis.n ?? 0) + 41; n + 1");
        const evalMs = performance.now() - t1;
        process.stdout.write(`\n$ uname -a   (exit ${result.exitCode})\n${out}\n`);
        process.stdout.write(`eval "n + 1" → ${JSON.stringify(evaluated.value)}\n\n`);
        process.stdout.write(
          `timings (${choice.accel}): qemu up ${fmtMs(timings.launchMs + timings.qmpMs)} · guest to agent ${fmtMs(timings.agentMs)} · exec uname ${fmtMs(execMs)} · eval ${fmtMs(evalMs)}\n`,
        );
      } finally {
        await vm.destroy();
      }
    });
}
