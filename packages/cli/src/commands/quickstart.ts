import {
  buildImage,
  chooseAccel,
  connectSandbox,
  createSnapshot,
  forkSandboxes,
  getSnapshot,
  isForkdError,
  killSandbox,
  pssBytes,
  removeSnapshot,
  Vm,
} from "@forkd/core";
import type { Command } from "commander";
import { fmtMs, plainTable, withSpinner } from "../ui.js";

const QUICKSTART_TAG = "quickstart";

export function registerQuickstart(program: Command): void {
  program
    .command("quickstart")
    .description(
      "build the base image, boot a VM, snapshot a warm parent, fork 10 children, run a command in each, print timings and memory",
    )
    .option("-n, --count <n>", "children to fork", (v) => Number(v), 10)
    .action(async (opts: { count: number }) => {
      const choice = await chooseAccel();
      process.stdout.write(`accel: ${choice.accel} (${choice.reason})\n\n`);
      const built = await withSpinner(
        "building the base image",
        (s) => buildImage({ name: "base", onProgress: (step) => (s.text = `base image: ${step}`) }),
        (r) => `base image ${r.cached ? "up to date" : "built"} (${r.manifest.digest.slice(0, 12)})`,
      );

      // 1. A cold boot, for comparison.
      const { vm, timings } = await withSpinner(
        "cold-booting a VM",
        () => Vm.boot({ image: built.manifest.name, ephemeral: true }),
        (r) => `cold boot to first answer: ${fmtMs(r.timings.totalMs)}`,
      );
      try {
        let out = "";
        await vm.agent.exec({ argv: ["uname", "-a"] }, { onStdout: (d) => (out += d) });
        process.stdout.write(`  $ uname -a\n  ${out}`);
      } finally {
        await vm.destroy();
      }

      // 2. A warm snapshot (reused when it is already there for this image).
      const existing = await getSnapshot(QUICKSTART_TAG).catch((err) =>
        isForkdError(err, "snapshot_not_found") ? undefined : Promise.reject(err),
      );
      if (existing && existing.image.digest !== built.manifest.digest) await removeSnapshot(QUICKSTART_TAG, { force: true });
      if (!existing || existing.image.digest !== built.manifest.digest) {
        await withSpinner(
          `snapshotting a warm parent as '${QUICKSTART_TAG}'`,
          (s) =>
            createSnapshot({
              tag: QUICKSTART_TAG,
              warmEval: [
                "globalThis.warmedAt = new Date().toISOString(); globalThis.greet = (who) => 'hello ' + who + ' from a warm context'",
              ],
              onProgress: (step) => (s.text = `snapshot: ${step}`),
            }),
          (snap) => `snapshot '${snap.tag}': device state saved in ${fmtMs(snap.timings.saveMs)}`,
        );
      } else {
        process.stdout.write(`✔ snapshot '${QUICKSTART_TAG}' already exists\n`);
      }

      // 3. Fork children, run a command in each, show timings and memory.
      const started = performance.now();
      const results = await withSpinner(`forking ${opts.count} children`, () => forkSandboxes({ tag: QUICKSTART_TAG, n: opts.count }));
      const wallMs = performance.now() - started;
      // Each child's first exec (answered by the guest's small native gate, without waking its JavaScript
      // runtime) and first eval (which wakes it), and the host memory it had before and after them.
      const table = plainTable([
        "CHILD",
        "RESTORE",
        "FIRST ANSWER",
        "TOTAL",
        "FIRST EXEC hostname",
        "FIRST EVAL greet()",
        "HOST MEMORY (PSS) idle → after",
      ]);
      try {
        for (const r of results) {
          if (!r.ok) {
            table.push([r.id, { colSpan: 6, content: `FAILED: ${r.error.message}` }]);
            continue;
          }
          const idlePss = pssBytes(r.pid) ?? 0;
          const agent = await connectSandbox(r.id);
          try {
            let host = "";
            const t0 = performance.now();
            await agent.exec({ argv: ["hostname"] }, { onStdout: (d) => (host += d) });
            const execMs = performance.now() - t0;
            const t1 = performance.now();
            const greeting = await agent.eval(`greet(${JSON.stringify(host.trim())})`);
            const evalMs = performance.now() - t1;
            table.push([
              r.id,
              fmtMs(r.timings.restoreMs),
              fmtMs(r.timings.firstAnswerMs),
              fmtMs(r.timings.totalMs),
              `${host.trim() === r.id ? "own hostname" : host.trim()} (${fmtMs(execMs)})`,
              `${String(greeting.value).length > 0 ? "ok" : "?"} (${fmtMs(evalMs)})`,
              `${(idlePss / 2 ** 20).toFixed(1)} → ${((pssBytes(r.pid) ?? 0) / 2 ** 20).toFixed(1)} MiB`,
            ]);
          } finally {
            agent.close();
          }
        }
        process.stdout.write(`${table.toString()}\n`);
        const ok = results.filter((r) => r.ok).length;
        process.stdout.write(`${ok}/${opts.count} children up in ${fmtMs(wallMs)} (cold boot: ${fmtMs(timings.totalMs)})\n`);
        if (ok < opts.count) process.exitCode = 1;
      } finally {
        await withSpinner(
          "cleaning up",
          () => Promise.all(results.filter((r) => r.ok).map((r) => killSandbox(r.id))),
          () => "children killed",
        );
      }
    });
}
