// bench fork-live: N children of a running sandbox in one call, through a real
// daemon: how long the source was paused, when the capture could be forked from,
// and the wall time from the call until every child answered through the API.
import { randomBytes } from "node:crypto";
import { ForkdError } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { startBenchDaemon } from "./fixtures.js";
import { emit, machine, percentile, round1 } from "./report.js";

export function registerForkLiveBench(bench: Command): void {
  bench
    .command("fork-live")
    .description(
      "live fork-to-many: source pause, capture ready and wall time to N children answering (a running source with state of its own)",
    )
    .option("-n, --count <n>", "children per call", parseIntOption("-n"), 10)
    .option("--memory-mib <n>", "guest memory of the source", parseIntOption("--memory-mib"), 256)
    .option("--samples <n>", "calls (each from the same running source); figures are medians", parseIntOption("--samples"), 3)
    .option("--image <name>", "guest image", "base")
    .option("--json", "print JSON")
    .action(async (opts: { count: number; memoryMib: number; samples: number; image: string; json?: boolean }) => {
      const n = opts.count;
      if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const run = randomBytes(3).toString("hex");
      const tag = `bench-live-${run}`;
      const tags: string[] = [];
      const ids: string[] = [];
      try {
        s.text = `snapshot ${tag} (${opts.memoryMib} MiB)`;
        await controller.createSnapshot({ tag, image: opts.image, memory_mib: opts.memoryMib });
        const source = (await controller.createSandboxes({ snapshot_tag: tag, n: 1 }))[0]!.id;
        ids.push(source);
        // State of its own the children must see: a file, a JavaScript global, a few MiB written.
        await controller.exec(source, {
          cmd: "dd if=/dev/urandom of=/root/state bs=1M count=4 2>/dev/null; md5sum /root/state > /root/state.md5",
        });
        await controller.eval(source, { code: "globalThis.liveMarker = 'captured'" });
        const samples: { pause: number; ready: number; wall: number; ok: number; pages: number }[] = [];
        for (let i = 0; i < opts.samples; i++) {
          s.text = `fork-live ${i + 1}/${opts.samples}: ${n} children`;
          const started = performance.now();
          const res = await controller.forkLive(source, { n, tag: `${tag}-c${i}` });
          tags.push(res.tag);
          ids.push(...res.sandboxes.map((c) => c.id));
          const answers = await Promise.allSettled(res.sandboxes.map((c) => controller.ping(c.id)));
          const wall = performance.now() - started;
          // Counted ok: answered, and sees the source's state (checked after the clock stopped).
          const seen = await Promise.allSettled(
            res.sandboxes.map(async (c, j) => {
              if (answers[j]!.status !== "fulfilled") throw new ForkdError("vm_timeout", `${c.id} did not answer`);
              const out = await controller.exec(c.id, { cmd: "md5sum -c /root/state.md5 >/dev/null && echo ok" });
              if (out.stdout.trim() !== "ok") throw new ForkdError("internal", `${c.id} does not see the source's state`);
              const marker = await controller.eval(c.id, { code: "globalThis.liveMarker" });
              if (marker.value !== "captured") throw new ForkdError("internal", `${c.id} does not see the source's JavaScript state`);
            }),
          );
          samples.push({
            pause: res.source_pause_ms,
            ready: res.capture_ready_ms,
            wall,
            ok: seen.filter((a) => a.status === "fulfilled").length,
            pages: res.captured_pages,
          });
          s.text = "removing the children";
          await Promise.all(res.sandboxes.map((c) => controller.deleteSandbox(c.id).catch(() => {})));
        }
        // The source still runs, untouched.
        await controller.ping(source);
        s.stop();
        const med = (pick: (x: (typeof samples)[number]) => number) => round1(percentile(samples.map(pick), 50));
        const result = {
          n,
          source_pause_ms: med((x) => x.pause),
          capture_ready_ms: med((x) => x.ready),
          wall_ms: med((x) => x.wall),
          ok: Math.min(...samples.map((x) => x.ok)),
          samples: samples.length,
          source_pause_ms_max: round1(Math.max(...samples.map((x) => x.pause))),
          capture_ready_ms_max: round1(Math.max(...samples.map((x) => x.ready))),
          captured_pages: med((x) => x.pages),
          memory_mib: opts.memoryMib,
          ...(await machine()),
        };
        emit("fork-live", result, opts);
        if (result.ok < n) process.exitCode = 1;
      } finally {
        s.stop();
        await Promise.all(ids.map((id) => controller.deleteSandbox(id).catch(() => {})));
        for (const t of tags) {
          await controller.waitForSnapshot(t, { timeoutMs: 120_000 }).catch(() => {});
          await controller.deleteSnapshot(t, { force: true }).catch(() => {});
        }
        await controller.deleteSnapshot(tag, { force: true, cascade: true }).catch(() => {});
        await stop();
      }
    });
}
