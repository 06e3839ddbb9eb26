// bench pool: a hot pool of N children through a real daemon: how long it takes to
// fill, then one fork of N from the full pool: each hand-out (taken from the pool,
// fresh identity answered) and the wall time until every child answered through the API.
import { randomBytes } from "node:crypto";
import { ForkdError } from "@forkd/core";
import type { Controller } from "@forkd/sdk";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { startBenchDaemon } from "./fixtures.js";
import { emit, machine, percentile, round1 } from "./report.js";

/** After the pool is full: long enough for the daemon's last refill step and its children's warm-up calls to end. */
const SETTLE_MS = 3000;

export function registerPoolBench(bench: Command): void {
  bench
    .command("pool")
    .description("fill a hot pool of N children, then fork N from it: fill time, hand-out time per child, wall time to N answering")
    .option("-n, --count <n>", "pool size and children forked from it", parseIntOption("-n"), 100)
    .option("--memory-mib <n>", "guest memory", parseIntOption("--memory-mib"), 128)
    .option("--image <name>", "guest image", "base")
    .option("--json", "print JSON")
    .action(async (opts: { count: number; memoryMib: number; image: string; json?: boolean }) => {
      const n = opts.count;
      if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const tag = `bench-pool-${randomBytes(3).toString("hex")}`;
      const ids: string[] = [];
      try {
        s.text = `snapshot ${tag} (${opts.memoryMib} MiB)`;
        await controller.createSnapshot({ tag, image: opts.image, memory_mib: opts.memoryMib });
        s.text = `filling a pool of ${n}`;
        const fillStarted = performance.now();
        await controller.setPool(tag, n);
        await waitReady(controller, tag, n, (ready) => (s.text = `filling a pool of ${n}: ${ready} ready`));
        const fillMs = performance.now() - fillStarted;
        await new Promise((r) => setTimeout(r, SETTLE_MS));
        s.text = `forking ${n} from the pool`;
        const started = performance.now();
        const children = await controller.createSandboxes({ snapshot_tag: tag, n });
        ids.push(...children.map((c) => c.id));
        const answers = await Promise.allSettled(children.map((c) => controller.ping(c.id)));
        const wallMs = performance.now() - started;
        const claims = children.flatMap((c) => (c.timings?.pool_claim_ms !== undefined ? [c.timings.pool_claim_ms] : []));
        const ok = answers.filter((a) => a.status === "fulfilled").length;
        s.stop();
        const result = {
          n,
          pool_size: n,
          fill_ms: round1(fillMs),
          claim_ms_p50: round1(percentile(claims, 50)),
          claim_ms_p99: round1(percentile(claims, 99)),
          wall_ms: round1(wallMs),
          ok,
          from_pool: claims.length,
          memory_mib: opts.memoryMib,
          ...(await machine()),
        };
        emit("pool", result, opts);
        if (ok < n) process.exitCode = 1;
      } finally {
        s.stop();
        await controller.deletePool(tag).catch(() => {});
        await Promise.all(ids.map((id) => controller.deleteSandbox(id).catch(() => {})));
        await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
        await stop();
      }
    });
}

async function waitReady(controller: Controller, tag: string, n: number, onProgress: (ready: number) => void): Promise<void> {
  const deadline = Date.now() + 30 * 60_000;
  for (;;) {
    const pool = await controller.getPool(tag);
    onProgress(pool.ready);
    if (pool.ready >= n) return;
    if (Date.now() > deadline) throw new ForkdError("vm_timeout", `the pool filled only ${pool.ready} of ${n} in 30 minutes`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
