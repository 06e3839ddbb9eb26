// bench confine: what confining a VMM (own uid, mount view, no capabilities,
// seccomp) costs a fork, against unconfined forks of the same snapshot in the
// same run, alternated so both see the same machine load.
import { randomBytes } from "node:crypto";
import { configureSettings, createSnapshot, ForkdError, forkSandboxes, killSandbox, removeSnapshot } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { emit, machine, p50, round1 } from "./report.js";

export function registerConfineBench(bench: Command): void {
  bench
    .command("confine")
    .description("one-child forks confined and unconfined, alternated: the extra time confinement costs")
    .option("-n, --count <n>", "forks of each kind", parseIntOption("-n"), 10)
    .option("--json", "print JSON")
    .action(async (opts: { count: number; json?: boolean }) => {
      if (opts.count < 1 || opts.count > 200) throw new ForkdError("bad_request", "-n must be from 1 to 200");
      if (process.geteuid?.() !== 0) throw new ForkdError("not_supported", "bench confine needs root (confined VMMs get their own uid)");
      const tag = `bench-confine-${randomBytes(4).toString("hex")}`;
      const s = spinner(`snapshot ${tag}`);
      let restoreSettings = () => {};
      const samples = {
        confined: [] as number[],
        unconfined: [] as number[],
        launch: { confined: [] as number[], unconfined: [] as number[] },
      };
      try {
        await createSnapshot({ tag, onProgress: (step) => (s.text = `snapshot: ${step}`) });
        for (let i = 0; i < opts.count * 2; i++) {
          const kind = i % 2 === 0 ? "confined" : "unconfined";
          s.text = `fork ${Math.floor(i / 2) + 1}/${opts.count} ${kind}`;
          restoreSettings();
          restoreSettings = configureSettings({ confine: kind === "confined" ? "on" : "off" });
          const [child] = await forkSandboxes({ tag, n: 1 });
          if (!child?.ok)
            throw new ForkdError("vm_start_failed", `a ${kind} fork failed: ${child && !child.ok ? child.error.message : "?"}`);
          samples[kind].push(child.timings.totalMs);
          samples.launch[kind].push(child.timings.vmmStartMs);
          await killSandbox(child.id);
        }
      } finally {
        restoreSettings();
        s.stop();
        await removeSnapshot(tag, { force: true }).catch(() => {});
      }
      const result = {
        ...(await machine()),
        n: opts.count,
        fork_ms_p50_confined: p50(samples.confined),
        fork_ms_p50_unconfined: p50(samples.unconfined),
        vmm_start_ms_p50_confined: p50(samples.launch.confined),
        vmm_start_ms_p50_unconfined: p50(samples.launch.unconfined),
        extra_ms_p50: round1(p50(samples.confined) - p50(samples.unconfined)),
        ratio: round1((p50(samples.confined) / p50(samples.unconfined)) * 100) / 100,
      };
      emit("confine", result, opts);
    });
}
