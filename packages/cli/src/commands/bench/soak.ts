// bench soak: the same day's work N times through the API of a real daemon process
// (spawn, exec, eval, files, BRANCH, kill, remove the branch), then what it still
// holds that it did not hold before: fds, processes, files, memory.
import { randomBytes } from "node:crypto";
import type { Controller } from "@forkd/sdk";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { footprint, startDaemonUnderTest } from "./daemon-under-test.js";
import { emit, machine, p50, round1 } from "./report.js";

const MODES = ["live", "diff", "full"] as const;

type SoakResult = {
  cycles: number;
  failed_cycles: number;
  failures: string[];
  fds_start: number;
  fds_end: number;
  leaked_fds: number;
  processes_start: number;
  processes_end: number;
  leaked_processes: number;
  files_start: number;
  files_end: number;
  leaked_files: number;
  rss_start_mib: number;
  rss_end_mib: number;
  rss_growth_mib: number;
  cycle_ms_p50: number;
  daemon_alive: boolean;
};

/** One cycle; throws with what did not answer as it should. */
async function cycle(c: Controller, tag: string, i: number): Promise<void> {
  const [child] = await c.createSandboxes({ snapshot_tag: tag, n: 1 });
  const id = child!.id;
  try {
    const exec = await c.exec(id, { argv: ["sh", "-c", 'echo "soak $0"', String(i)] });
    if (exec.stdout !== `soak ${i}\n` || exec.exit_code !== 0) throw new Error(`exec answered ${JSON.stringify(exec)}`);
    const evaluated = await c.eval(id, { code: `${i} + 1` });
    if (evaluated.value !== i + 1) throw new Error(`eval answered ${JSON.stringify(evaluated)}`);
    await c.files(id, { action: "write", path: "/root/soak.txt", data: `cycle ${i}` });
    const read = await c.files<{ data: string }>(id, { action: "read", path: "/root/soak.txt" });
    if (Buffer.from(read.data, "base64").toString() !== `cycle ${i}`) throw new Error(`files read answered ${JSON.stringify(read)}`);
    const list = await c.files<{ entries: { name: string }[] }>(id, { action: "list", path: "/root" });
    if (!list.entries.some((e) => e.name === "soak.txt")) throw new Error(`files list answered ${JSON.stringify(list).slice(0, 300)}`);
    const branchTag = `${tag}-b${i}`;
    const branch = await c.branchSandbox(id, { tag: branchTag, mode: MODES[i % MODES.length] });
    if (branch.status !== "ready") throw new Error(`BRANCH answered ${JSON.stringify(branch).slice(0, 300)}`);
    await c.deleteSnapshot(branchTag);
  } finally {
    await c.deleteSandbox(id);
  }
}

/** Give asynchronous teardown (reaper, closing sockets, exiting VMMs) a moment to finish before measuring. */
async function settled(measure: () => ReturnType<typeof footprint>, floor: ReturnType<typeof footprint>) {
  let now = measure();
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline && (now.fds > floor.fds || now.processes > floor.processes || now.files > floor.files)) {
    await new Promise((r) => setTimeout(r, 250));
    now = measure();
  }
  return now;
}

export function registerSoakBench(bench: Command): void {
  bench
    .command("soak")
    .description(
      "spawn, exec, eval, files, BRANCH and kill N times through a real daemon process; report the fds, processes, files and RSS it kept",
    )
    .option("--cycles <n>", "cycles of the whole workload", parseIntOption("--cycles"), 50)
    .option("--memory-mib <n>", "RAM of the snapshot the sandboxes fork from", parseIntOption("--memory-mib"), 128)
    .option("--json", "print JSON")
    .action(async (opts: { cycles: number; memoryMib: number; json?: boolean }) => {
      const s = spinner("starting a daemon");
      const daemon = await startDaemonUnderTest({ prefix: "soak" });
      const tag = `soak-${randomBytes(3).toString("hex")}`;
      try {
        let c = daemon.controller();
        s.text = "warm snapshot";
        await c.createSnapshot({ tag, memory_mib: opts.memoryMib });
        // One cycle before the baseline: pools, caches and lazily loaded code exist from then on.
        s.text = "warm-up cycle";
        await cycle(c, tag, 0);
        await c.close();
        await new Promise((r) => setTimeout(r, 500));
        const start = footprint(daemon);
        c = daemon.controller();
        const failures: string[] = [];
        let failed = 0;
        const times: number[] = [];
        for (let i = 1; i <= opts.cycles; i++) {
          s.text = `cycle ${i}/${opts.cycles}${failed ? ` (${failed} failed)` : ""}`;
          const t0 = performance.now();
          try {
            await cycle(c, tag, i);
          } catch (err) {
            failed++;
            if (failures.length < 10) failures.push(`cycle ${i}: ${(err as Error).message}`);
          }
          times.push(performance.now() - t0);
        }
        await c.close();
        const end = await settled(() => footprint(daemon), start);
        s.stop();
        const result: SoakResult & Record<string, unknown> = {
          ...(await machine()),
          cycles: opts.cycles,
          failed_cycles: failed,
          failures,
          fds_start: start.fds,
          fds_end: end.fds,
          leaked_fds: Math.max(0, end.fds - start.fds),
          processes_start: start.processes,
          processes_end: end.processes,
          leaked_processes: Math.max(0, end.processes - start.processes),
          files_start: start.files,
          files_end: end.files,
          leaked_files: Math.max(0, end.files - start.files),
          rss_start_mib: round1(start.rssMib),
          rss_end_mib: round1(end.rssMib),
          rss_growth_mib: round1(end.rssMib - start.rssMib),
          cycle_ms_p50: p50(times),
          daemon_alive: daemon.alive(),
        };
        emit("soak", result, opts);
        if (failed > 0) process.exitCode = 1;
      } finally {
        s.stop();
        await daemon
          .controller()
          .deleteSnapshot(tag, { force: true, cascade: true })
          .catch(() => {});
        await daemon.stop();
      }
    });
}
