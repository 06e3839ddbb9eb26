// bench chain: what the depth of a diff chain costs a spawn. Builds a chain of
// BRANCHes (each child dirties a few MiB first), then forks one child at a time
// from depth 1 and from the deepest layer, alternated, with their images staged;
// and times staging itself (assembling the chain) at both depths.
import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import {
  connectSandbox,
  createSnapshot,
  ForkdError,
  forkSandboxes,
  getSnapshot,
  killSandbox,
  physicalBytes,
  removeSnapshot,
  stagedPath,
  stageSnapshot,
  startBranch,
} from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { emit, MIB, machine, p50, round1 } from "./report.js";

async function forkOne(tag: string): Promise<{ id: string; ms: number }> {
  const [child] = await forkSandboxes({ tag, n: 1 });
  if (!child?.ok) throw new ForkdError("vm_start_failed", `fork of ${tag} failed: ${child && !child.ok ? child.error.message : "?"}`);
  return { id: child.id, ms: child.timings.totalMs };
}

export function registerChainBench(bench: Command): void {
  bench
    .command("chain")
    .description("spawn time at chain depth 1 and at the deepest layer, in one run: the per-link tax of diff chains")
    .option("--depth <n>", "layers in the chain", parseIntOption("--depth"), 5)
    .option("--samples <n>", "forks at each depth", parseIntOption("--samples"), 8)
    .option("--dirty-mib <n>", "MiB each link's sandbox writes before its BRANCH", parseIntOption("--dirty-mib"), 10)
    .option("--json", "print JSON")
    .action(async (opts: { depth: number; samples: number; dirtyMib: number; json?: boolean }) => {
      if (opts.depth < 2 || opts.depth > 20) throw new ForkdError("bad_request", "--depth must be from 2 to 20");
      const run = randomBytes(3).toString("hex");
      const tags = [`bench-chain-${run}-0`];
      const s = spinner("base snapshot");
      const live: string[] = [];
      try {
        await createSnapshot({ tag: tags[0]!, onProgress: (step) => (s.text = `base snapshot: ${step}`) });
        for (let d = 1; d <= opts.depth; d++) {
          s.text = `building the chain: layer ${d}/${opts.depth}`;
          const { id } = await forkOne(tags[d - 1]!);
          live.push(id);
          const agent = await connectSandbox(id);
          try {
            await agent.exec({ argv: ["dd", "if=/dev/urandom", `of=/tmp/layer-${d}`, "bs=1M", `count=${opts.dirtyMib}`] });
          } finally {
            agent.close();
          }
          const tag = `bench-chain-${run}-${d}`;
          const started = await startBranch(id, { tag });
          const done = await started.done;
          if (done.status !== "ready") throw new ForkdError("vm_start_failed", `BRANCH ${tag} failed: ${done.error}`);
          tags.push(tag);
          await killSandbox(id);
          live.pop();
        }
        const shallow = tags[1]!;
        const deep = tags[opts.depth]!;
        // Staging from scratch: the chain is assembled once per head.
        const stageMs: Record<string, number> = {};
        for (const tag of [shallow, deep]) {
          s.text = `staging ${tag} from the durable store`;
          for (const t of tags) await fsp.rm(path.dirname(stagedPath(await getSnapshot(t))), { recursive: true, force: true });
          const t0 = performance.now();
          await stageSnapshot(await getSnapshot(tag));
          stageMs[tag] = performance.now() - t0;
        }
        const samples: Record<string, number[]> = { [shallow]: [], [deep]: [] };
        for (let i = 0; i < opts.samples * 2; i++) {
          const tag = i % 2 === 0 ? shallow : deep;
          s.text = `fork ${Math.floor(i / 2) + 1}/${opts.samples} at depth ${i % 2 === 0 ? 1 : opts.depth}`;
          const { id, ms } = await forkOne(tag);
          samples[tag]!.push(ms);
          await killSandbox(id);
        }
        const snaps = await Promise.all(tags.map((t) => getSnapshot(t)));
        const layers = snaps.slice(1).map((snap) => physicalBytes(snap));
        const full = snaps[0]!.sizes.memoryBytes;
        s.stop();
        const result = {
          ...(await machine()),
          depth: opts.depth,
          dirty_mib_per_link: opts.dirtyMib,
          spawn_ms_p50_depth1: p50(samples[shallow]!),
          [`spawn_ms_p50_depth${opts.depth}`]: p50(samples[deep]!),
          chain_tax_ms_per_link: round1((p50(samples[deep]!) - p50(samples[shallow]!)) / (opts.depth - 1)),
          stage_ms_depth1: round1(stageMs[shallow]!),
          [`stage_ms_depth${opts.depth}`]: round1(stageMs[deep]!),
          layer_mib_p50: round1(p50(layers) / MIB),
          full_copy_mib: round1(full / MIB),
          layer_vs_full: round1((p50(layers) / full) * 1000) / 1000,
        };
        emit("chain", result, opts);
      } finally {
        s.stop();
        for (const id of live) await killSandbox(id).catch(() => {});
        await removeSnapshot(tags[0]!, { force: true, cascade: true }).catch(() => {});
      }
    });
}
