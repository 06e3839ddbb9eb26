// bench spawn: fork N children from a warm snapshot against cold boots of the same image, in one run:
// one child alone, a fan-out of N/10 and of N (scaling), idle CPU per child, memory per child.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import {
  type AgentClient,
  chooseAccel,
  createSnapshot,
  defaultRestoreConcurrency,
  ForkdError,
  forkSandboxes,
  killSandbox,
  parseAccel,
  pssBytes,
  removeSnapshot,
} from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, spinner } from "../../ui.js";
import { coldBootsMs, vmmFloorBytes } from "./fixtures.js";
import { emit, MIB, machine, p50, percentile, round1 } from "./report.js";

/** Idle children measured at once, and for how long. */
const IDLE_CHILDREN = 20;
const IDLE_WINDOW_MS = 10_000;
/** Children forked one at a time, alone on the machine, for single_child_ms. */
const SINGLE_RUNS = 5;
/** Children forked one after another for first_exec_ms and the first call's memory (issue #20: p50 over 20). */
const FIRST_EXEC_RUNS = 20;
/** Children forked one after another for first_eval_ms. */
const FIRST_EVAL_RUNS = 10;
/** What a restored child is left to settle before its idle PSS is read (its first page faults after cont). */
const IDLE_SETTLE_MS = 300;

/** CPU a process has used, every thread (QEMU's main loop, vCPU, I/O) included, in ms; ns precision from schedstat. */
function processCpuMs(pid: number): number | undefined {
  try {
    let ns = 0;
    for (const task of fs.readdirSync(`/proc/${pid}/task`)) {
      const stat = fs.readFileSync(`/proc/${pid}/task/${task}/schedstat`, "utf8");
      ns += Number(stat.split(" ")[0]);
    }
    return ns / 1e6;
  } catch {
    return undefined;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function registerSpawnBench(bench: Command): void {
  bench
    .command("spawn")
    .description(
      "fork N children from a warm snapshot: one child alone, N/10 and N at once (scaling), idle CPU and memory per child, and cold boots side by side",
    )
    .option("-n, --count <n>", "children", parseIntOption("-n"), 100)
    .option("--image <name>", "guest image", "base")
    .option("--memory-mib <n>", "guest memory", parseIntOption("--memory-mib"), 256)
    .option("--concurrency <n>", "restores in flight (default: from the host's cores)", parseIntOption("--concurrency"))
    .option("--cold-runs <n>", "cold boots to compare against", parseIntOption("--cold-runs"), 3)
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print JSON")
    .action(
      async (opts: {
        count: number;
        image: string;
        memoryMib: number;
        concurrency?: number;
        coldRuns: number;
        accel?: string;
        json?: boolean;
      }) => {
        const n = opts.count;
        if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
        const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
        const concurrency = opts.concurrency ?? defaultRestoreConcurrency();
        const tag = `bench-spawn-${randomBytes(4).toString("hex")}`;
        const s = spinner(`snapshot ${tag}`);
        const ids: string[] = [];
        const agents = new Map<string, AgentClient>();
        const killAll = async () => {
          for (const agent of agents.values()) agent.close();
          agents.clear();
          await Promise.all(ids.splice(0).map((id) => killSandbox(id).catch(() => {})));
        };
        const fanOut = async (count: number, label: string) => {
          let done = 0;
          const started = performance.now();
          const results = await forkSandboxes({
            tag,
            n: count,
            concurrency,
            // Held open, as the daemon holds them: an idle child is one whose host is attached and silent.
            keepAgent: (id, agent) => agents.set(id, agent),
            onChild: (r) => {
              if (r.ok) ids.push(r.id);
              s.text = `${label}: ${++done}/${count}`;
            },
          });
          return { results, wallMs: performance.now() - started };
        };
        try {
          await createSnapshot({
            tag,
            image: opts.image,
            memoryMib: opts.memoryMib,
            accel,
            onProgress: (step) => (s.text = `snapshot: ${step}`),
          });

          // One child alone: spawn (the API call) to its identity answered; then its first exec,
          // which wakes the agent's JavaScript runtime (the identity never did).
          const single: number[] = [];
          const firstExec: number[] = [];
          for (let i = 0; i < SINGLE_RUNS; i++) {
            s.text = `one child alone ${i + 1}/${SINGLE_RUNS}`;
            const started = performance.now();
            const [r] = await forkSandboxes({ tag, n: 1, keepAgent: (id, agent) => agents.set(id, agent) });
            if (!r?.ok) throw new ForkdError("vm_start_failed", `a single child failed: ${r?.error.message ?? "no result"}`);
            single.push(performance.now() - started);
            ids.push(r.id);
            const execStarted = performance.now();
            await agents.get(r.id)?.exec({ argv: ["true"] });
            firstExec.push(performance.now() - execStarted);
            await killAll();
          }

          // The first call users feel: spawn to the first `exec true` answered, and the host memory a child
          // gains from idle to after that exec and a first small file write (QEMU's translation cache for
          // the code the call ran, guest pages the call dirtied).
          const firstExecMs: number[] = [];
          for (let i = 0; i < FIRST_EXEC_RUNS; i++) {
            s.text = `first exec ${i + 1}/${FIRST_EXEC_RUNS}`;
            const started = performance.now();
            const [r] = await forkSandboxes({ tag, n: 1, keepAgent: (id, agent) => agents.set(id, agent) });
            if (!r?.ok) throw new ForkdError("vm_start_failed", `a child failed: ${r?.error.message ?? "no result"}`);
            ids.push(r.id);
            await agents.get(r.id)?.exec({ argv: ["true"] });
            firstExecMs.push(performance.now() - started);
            await killAll();
          }
          // Memory of the first calls, each child measured against itself: idle after its identity, then
          // after its first exec and a first small file write. Reading PSS touches nothing in the guest.
          const idlePss: number[] = [];
          const firstCallGrowth: number[] = [];
          for (let i = 0; i < SINGLE_RUNS; i++) {
            s.text = `first-call memory ${i + 1}/${SINGLE_RUNS}`;
            const [r] = await forkSandboxes({ tag, n: 1, keepAgent: (id, agent) => agents.set(id, agent) });
            if (!r?.ok) throw new ForkdError("vm_start_failed", `a child failed: ${r?.error.message ?? "no result"}`);
            ids.push(r.id);
            const agent = agents.get(r.id);
            await sleep(IDLE_SETTLE_MS);
            const idle = pssBytes(r.pid) ?? Number.NaN;
            await agent?.exec({ argv: ["true"] });
            await agent?.files({ action: "write", path: "/tmp/first-write.txt", data: Buffer.from("hello\n").toString("base64") });
            await sleep(IDLE_SETTLE_MS);
            idlePss.push(idle);
            firstCallGrowth.push((pssBytes(r.pid) ?? Number.NaN) - idle);
            await killAll();
          }
          const firstEvalMs: number[] = [];
          for (let i = 0; i < FIRST_EVAL_RUNS; i++) {
            s.text = `first eval ${i + 1}/${FIRST_EVAL_RUNS}`;
            const [r] = await forkSandboxes({ tag, n: 1, keepAgent: (id, agent) => agents.set(id, agent) });
            if (!r?.ok) throw new ForkdError("vm_start_failed", `a child failed: ${r?.error.message ?? "no result"}`);
            ids.push(r.id);
            const evalStarted = performance.now();
            await agents.get(r.id)?.eval("1+1");
            firstEvalMs.push(performance.now() - evalStarted);
            await killAll();
          }

          // Scaling: the same fan-out at N/10 and at N, one after the other.
          const small = Math.max(1, Math.round(n / 10));
          const smallRun = await fanOut(small, `forking ${small} (N/10)`);
          const smallOk = smallRun.results.filter((r) => r.ok).length;
          await killAll();
          await sleep(1000);
          const { results, wallMs } = await fanOut(n, `forking ${n}`);
          const ok = results.flatMap((r) => (r.ok ? [r] : []));

          s.text = "letting children settle, then reading their memory";
          await sleep(2000);
          const pss = ok.map((r) => pssBytes(r.pid) ?? 0);
          const pssPerChild = pss.reduce((a, b) => a + b, 0) / Math.max(1, ok.length);
          // The floor beside them: QEMU's own pages are shared by every QEMU alive, so a bare
          // VMM measured alone would carry all of them and a child a hundredth.
          s.text = "measuring a bare VMM beside the children";
          const floor = await vmmFloorBytes(tag);

          // Idle: IDLE_CHILDREN of them (the rest killed), agents attached and silent, over a 10 s window.
          s.text = "measuring idle children";
          const idle = ok.slice(0, IDLE_CHILDREN);
          const rest = ok.slice(IDLE_CHILDREN).map((r) => r.id);
          for (const id of rest) agents.get(id)?.close();
          await Promise.all(rest.map((id) => killSandbox(id).catch(() => {})));
          await sleep(2000);
          const before = idle.map((r) => processCpuMs(r.pid));
          const windowStart = performance.now();
          await sleep(IDLE_WINDOW_MS);
          const after = idle.map((r) => processCpuMs(r.pid));
          const windowS = (performance.now() - windowStart) / 1000;
          const idlePerChild = idle.flatMap((_, i) => {
            const a = before[i];
            const b = after[i];
            return a !== undefined && b !== undefined ? [(b - a) / windowS] : [];
          });
          s.text = "killing children";
          await killAll();

          const cold = await coldBootsMs(opts.coldRuns, opts.image, accel, (i) => (s.text = `cold boot ${i + 1}/${opts.coldRuns}`));
          const coldMs = percentile(cold, 50);
          const singleMs = percentile(single, 50);
          const perChild = ok.map((r) => r.timings.totalMs);
          const firstExecP50 = percentile(firstExecMs, 50);
          const idlePssMib = percentile(idlePss, 50) / MIB;
          const firstCallPssMib = percentile(firstCallGrowth, 50) / MIB;
          const result = {
            ...(await machine(accel)),
            n,
            ok: ok.length,
            concurrency,
            memory_mib: opts.memoryMib,
            wall_ms: round1(wallMs),
            vmm_start_ms: p50(ok.map((r) => r.timings.vmmStartMs)),
            restore_ms_p50: p50(ok.map((r) => r.timings.restoreMs)),
            first_answer_ms_p50: p50(ok.map((r) => r.timings.firstAnswerMs)),
            per_child_ms_p50: round1(percentile(perChild, 50)),
            per_child_ms_p99: round1(percentile(perChild, 99)),
            // One child alone, spawn to identity answered (p50 of SINGLE_RUNS), against a cold boot of the same image.
            single_child_ms: round1(singleMs),
            single_child_first_exec_ms: p50(firstExec),
            // Issue #20: spawn to the first `exec true` answered, p50 of FIRST_EXEC_RUNS children forked one after another.
            first_exec_ms: round1(firstExecP50),
            first_exec_vs_cold: round1(coldMs / firstExecP50),
            first_exec_runs: firstExecMs.length,
            // PSS of a child idle after its identity (alone beside whatever else runs on the host), and what it gains
            // with its first exec and a first small file write; the total is 100 such children after their first calls.
            idle_pss_mib: round1(idlePssMib),
            first_exec_pss_mib: round1(firstCallPssMib),
            first_exec_pss_total_100_mib: Math.round((idlePssMib + firstCallPssMib) * 100),
            // The warm runtime's reason to exist: a child's first eval (1+1) after its identity, p50.
            first_eval_ms: p50(firstEvalMs),
            cold_boot_ms: round1(coldMs),
            single_child_vs_cold: round1(coldMs / singleMs),
            // Wall per child at N over wall per child at N/10, both in this run: 1 is linear.
            scaling_n: small,
            scaling_wall_ms: round1(smallRun.wallMs),
            scaling: smallOk === small ? Math.round((wallMs / n / (smallRun.wallMs / small)) * 100) / 100 : null,
            idle_children: idlePerChild.length,
            idle_cpu_ms_per_s: Math.round((idlePerChild.reduce((a, b) => a + b, 0) / Math.max(1, idlePerChild.length)) * 100) / 100,
            idle_cpu_ms_per_s_max: Math.round(Math.max(0, ...idlePerChild) * 100) / 100,
            pss_per_child_mib: round1(pssPerChild / MIB),
            vmm_floor_mib: round1(floor / MIB),
            guest_delta_mib: round1((pssPerChild - floor) / MIB),
            // Per VM: one cold boot against one child's restore-to-answer under the fan-out, both measured in this run.
            speedup_vs_cold: round1(coldMs / percentile(perChild, 50)),
            // Amortised: n cold boots one after another against the whole fan-out.
            fanout_speedup_vs_cold: round1((coldMs * n) / wallMs),
            failures: results.flatMap((r) => (r.ok ? [] : [r.error])),
          };
          s.stop();
          emit("spawn", result, opts);
          if (!opts.json) for (const f of result.failures) process.stdout.write(`failure: ${f.message}\n`);
          if (ok.length < n) process.exitCode = 1;
        } finally {
          s.stop();
          await killAll();
          await removeSnapshot(tag, { force: true }).catch(() => {});
        }
      },
    );
}
