import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import {
  chooseAccel,
  connectSandbox,
  createSnapshot,
  ensureStaged,
  ForkdError,
  forkSandboxes,
  getSnapshot,
  killAndWait,
  killSandbox,
  launchQemu,
  makeRunDir,
  newSandboxId,
  parseAccel,
  planRestore,
  pssBytes,
  QmpClient,
  removeSnapshot,
  runtimePaths,
  Vm,
} from "@forkd/core";
import { Controller } from "@forkd/sdk";
import type { Command } from "commander";
import { parseIntOption, percentile, plainTable, round1, spinner } from "../ui.js";

const MIB = 2 ** 20;

async function coldBootsMs(runs: number, image: string, accel: "kvm" | "tcg", onStep: (i: number) => void): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    onStep(i);
    const { vm, timings } = await Vm.boot({ image, accel, ephemeral: true });
    samples.push(timings.totalMs);
    await vm.destroy();
  }
  return samples;
}

/** PSS of a QEMU started exactly like a child (same flags, same memory file) but with no guest running. */
async function vmmFloorBytes(tag: string): Promise<number> {
  const snapshot = await getSnapshot(tag);
  const memoryPath = await ensureStaged(snapshot);
  const id = newSandboxId();
  const runDir = await makeRunDir(id);
  const launched = launchQemu({
    plan: planRestore(snapshot, { runDir, memory: { kind: "file", path: memoryPath, share: false }, network: true }),
    dieWithParent: true,
  });
  try {
    const qmp = await QmpClient.connect(runtimePaths(runDir).qmp);
    await new Promise((r) => setTimeout(r, 500));
    const pss = pssBytes(launched.pid) ?? Number.NaN;
    qmp.close();
    return pss;
  } finally {
    await killAndWait(launched.pid, runDir, launched);
    fs.rmSync(runDir, { recursive: true, force: true });
  }
}

/** A real daemon process on a private socket, for benchmarks that measure through the API. */
async function startBenchDaemon(): Promise<{ controller: Controller; stop: () => Promise<void> }> {
  const dir = fs.mkdtempSync(`${os.tmpdir()}/forkd-bench-`);
  const tokenFile = `${dir}/token`;
  fs.writeFileSync(tokenFile, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  const token = fs.readFileSync(tokenFile, "utf8").trim();
  const socket = `${dir}/forkd.sock`;
  const daemon = spawn(
    process.execPath,
    [process.argv[1]!, "daemon", "--socket", socket, "--listen", "none", "--token-file", tokenFile, "--audit-log", `${dir}/audit.log`],
    {
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let log = "";
  daemon.stderr!.setEncoding("utf8").on("data", (d: string) => (log += d));
  const stop = async () => {
    await controller.close();
    if (daemon.exitCode === null) {
      daemon.kill("SIGTERM");
      await new Promise((r) => daemon.once("exit", r));
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const controller = new Controller({ socketPath: socket, token });
  const deadline = Date.now() + 60_000;
  while (!/unix /.test(log)) {
    if (daemon.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new ForkdError("internal", `the daemon did not start: ${log}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { controller, stop };
}

function writeResult(name: string, result: unknown): void {
  const dir = process.env.FORKD_BENCH_DIR;
  if (!dir) return;
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(`${dir}/${name}.json`, `${JSON.stringify(result, null, 2)}\n`);
}

export function registerBench(program: Command): void {
  const bench = program.command("bench").description("benchmarks that print a table or JSON");
  bench
    .command("boot")
    .description("cold boot to first agent ping, several runs")
    .option("--runs <n>", "number of boots", parseIntOption("--runs"), 5)
    .option("--image <name>", "guest image", "base")
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print JSON")
    .action(async (opts: { runs: number; image: string; accel?: string; json?: boolean }) => {
      if (opts.runs < 1 || opts.runs > 100) throw new ForkdError("bad_request", "--runs must be from 1 to 100");
      const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
      const s = spinner("cold boots");
      let samples: number[];
      try {
        samples = await coldBootsMs(opts.runs, opts.image, accel, (i) => (s.text = `cold boot ${i + 1}/${opts.runs}`));
      } finally {
        s.stop();
      }
      const result = {
        accel,
        runs: opts.runs,
        boot_to_ping_ms_p50: round1(percentile(samples, 50)),
        boot_to_ping_ms_max: round1(Math.max(...samples)),
        boot_to_ping_ms_min: round1(Math.min(...samples)),
        cpus: os.cpus().length,
      };
      writeResult("boot", result);
      if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else {
        process.stdout.write(
          `boot → first ping (${accel}, ${opts.runs} runs): p50 ${result.boot_to_ping_ms_p50} ms, min ${result.boot_to_ping_ms_min} ms, max ${result.boot_to_ping_ms_max} ms\n`,
        );
      }
    });

  bench
    .command("spawn")
    .description("fork N children from a warm snapshot; wall time, per-child timings, memory per child, and cold boots side by side")
    .option("-n, --count <n>", "children", parseIntOption("-n"), 100)
    .option("--image <name>", "guest image", "base")
    .option("--memory-mib <n>", "guest memory", parseIntOption("--memory-mib"), 256)
    .option("--concurrency <n>", "restores in flight", parseIntOption("--concurrency"), 8)
    .option("--cold-runs <n>", "cold boots to compare against", parseIntOption("--cold-runs"), 3)
    .option("--accel <mode>", "kvm or tcg")
    .option("--json", "print JSON")
    .action(
      async (opts: {
        count: number;
        image: string;
        memoryMib: number;
        concurrency: number;
        coldRuns: number;
        accel?: string;
        json?: boolean;
      }) => {
        const n = opts.count;
        if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
        const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
        const tag = `bench-spawn-${randomBytes(4).toString("hex")}`;
        const s = spinner(`snapshot ${tag}`);
        const ids: string[] = [];
        try {
          await createSnapshot({
            tag,
            image: opts.image,
            memoryMib: opts.memoryMib,
            accel,
            onProgress: (step) => (s.text = `snapshot: ${step}`),
          });
          s.text = "measuring a bare VMM";
          const floor = await vmmFloorBytes(tag);
          s.text = `forking ${n}`;
          let done = 0;
          const started = performance.now();
          const results = await forkSandboxes({
            tag,
            n,
            concurrency: opts.concurrency,
            onChild: (r) => {
              if (r.ok) ids.push(r.id);
              s.text = `forking: ${++done}/${n}`;
            },
          });
          const wallMs = performance.now() - started;
          const ok = results.flatMap((r) => (r.ok ? [r] : []));
          s.text = "letting children settle, then reading their memory";
          await new Promise((r) => setTimeout(r, 2000));
          const pss = ok.map((r) => pssBytes(r.pid) ?? 0);
          const pssPerChild = pss.reduce((a, b) => a + b, 0) / Math.max(1, ok.length);
          s.text = "killing children";
          await Promise.all(ids.splice(0).map((id) => killSandbox(id)));
          const cold = await coldBootsMs(opts.coldRuns, opts.image, accel, (i) => (s.text = `cold boot ${i + 1}/${opts.coldRuns}`));
          const coldMs = percentile(cold, 50);
          const perChild = ok.map((r) => r.timings.totalMs);
          const result = {
            accel,
            n,
            ok: ok.length,
            cpus: os.cpus().length,
            concurrency: opts.concurrency,
            memory_mib: opts.memoryMib,
            wall_ms: round1(wallMs),
            vmm_start_ms: round1(
              percentile(
                ok.map((r) => r.timings.vmmStartMs),
                50,
              ),
            ),
            restore_ms_p50: round1(
              percentile(
                ok.map((r) => r.timings.restoreMs),
                50,
              ),
            ),
            first_answer_ms_p50: round1(
              percentile(
                ok.map((r) => r.timings.firstAnswerMs),
                50,
              ),
            ),
            per_child_ms_p50: round1(percentile(perChild, 50)),
            per_child_ms_p99: round1(percentile(perChild, 99)),
            pss_per_child_mib: round1(pssPerChild / MIB),
            vmm_floor_mib: round1(floor / MIB),
            guest_delta_mib: round1((pssPerChild - floor) / MIB),
            cold_boot_ms: round1(coldMs),
            // Per VM: one cold boot against one child's restore-to-answer, both measured in this run.
            speedup_vs_cold: round1(coldMs / percentile(perChild, 50)),
            // Amortised: n cold boots one after another against the whole fan-out.
            fanout_speedup_vs_cold: round1((coldMs * n) / wallMs),
            failures: results.flatMap((r) => (r.ok ? [] : [r.error])),
          };
          s.stop();
          writeResult("spawn", result);
          if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
          else {
            for (const [k, v] of Object.entries(result)) if (k !== "failures") process.stdout.write(`${k.padEnd(24)} ${v}\n`);
            for (const f of result.failures) process.stdout.write(`failure: ${f.message}\n`);
          }
          if (ok.length < n) process.exitCode = 1;
        } finally {
          s.stop();
          await Promise.all(ids.map((id) => killSandbox(id).catch(() => {})));
          await removeSnapshot(tag, { force: true }).catch(() => {});
        }
      },
    );

  bench
    .command("api")
    .description("round trips through a real daemon process: eval of 1+1, exec of true, and one spawn against the direct path")
    .option("--evals <n>", "eval round trips", parseIntOption("--evals"), 200)
    .option("--execs <n>", "exec round trips", parseIntOption("--execs"), 30)
    .option("--spawns <n>", "single-child spawns on each path", parseIntOption("--spawns"), 3)
    .option("--json", "print JSON")
    .action(async (opts: { evals: number; execs: number; spawns: number; json?: boolean }) => {
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const tag = `bench-api-${randomBytes(4).toString("hex")}`;
      const created: string[] = [];
      try {
        s.text = "snapshot";
        await controller.createSnapshot({ tag });
        const apiSpawn: number[] = [];
        const directSpawn: number[] = [];
        for (let i = 0; i < opts.spawns; i++) {
          s.text = `spawn ${i + 1}/${opts.spawns} through the API`;
          const t0 = performance.now();
          const res = await controller.createSandboxes({ snapshot_tag: tag, n: 1 });
          apiSpawn.push(performance.now() - t0);
          created.push(...res.sandboxes.map((c) => c.id));
          s.text = `spawn ${i + 1}/${opts.spawns} directly`;
          const t1 = performance.now();
          const [direct] = await forkSandboxes({ tag, n: 1 });
          directSpawn.push(performance.now() - t1);
          if (direct?.ok) await killSandbox(direct.id);
        }
        const id = created[0]!;
        // Warm the path once, as a client that has used its sandbox before would have.
        for (let i = 0; i < 5; i++) await controller.eval(id, { code: "1+1" });
        await controller.exec(id, { argv: ["true"] });
        const evalRtt: number[] = [];
        for (let i = 0; i < opts.evals; i++) {
          if (i % 20 === 0) s.text = `eval ${i}/${opts.evals}`;
          const t0 = performance.now();
          await controller.eval(id, { code: "1+1" });
          evalRtt.push(performance.now() - t0);
        }
        const execRtt: number[] = [];
        for (let i = 0; i < opts.execs; i++) {
          s.text = `exec ${i}/${opts.execs}`;
          const t0 = performance.now();
          await controller.exec(id, { argv: ["true"] });
          execRtt.push(performance.now() - t0);
        }
        s.stop();
        const result = {
          accel: (await chooseAccel()).accel,
          cpus: os.cpus().length,
          transport: "unix socket",
          eval_rtt_ms_p50: round1(percentile(evalRtt, 50)),
          eval_rtt_ms_p99: round1(percentile(evalRtt, 99)),
          exec_rtt_ms_p50: round1(percentile(execRtt, 50)),
          exec_rtt_ms_p99: round1(percentile(execRtt, 99)),
          api_spawn_ms_p50: round1(percentile(apiSpawn, 50)),
          direct_spawn_ms_p50: round1(percentile(directSpawn, 50)),
          rest_spawn_overhead_ms: round1(percentile(apiSpawn, 50) - percentile(directSpawn, 50)),
        };
        writeResult("api", result);
        if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
        else for (const [k, v] of Object.entries(result)) process.stdout.write(`${k.padEnd(24)} ${v}\n`);
      } finally {
        s.stop();
        for (const id of created) await controller.deleteSandbox(id).catch(() => {});
        await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
        await stop();
      }
    });

  bench
    .command("branch")
    .description("BRANCH pause and total time for each mode, guest memory size and workload (idle, or dirtying memory as fast as it can)")
    .option("--samples <n>", "consecutive BRANCHes of one source per row", parseIntOption("--samples"), 6)
    .option("--nowait-samples <n>", "wait:false BRANCHes per row", parseIntOption("--nowait-samples"), 2)
    .option("--sizes <list>", "guest memory sizes in MiB", "256,1024")
    .option("--modes <list>", "modes", "live,diff,full")
    .option("--workloads <list>", "idle and/or dirty", "idle,dirty")
    .option("--json", "print JSON")
    .action(async (opts: { samples: number; nowaitSamples: number; sizes: string; modes: string; workloads: string; json?: boolean }) => {
      const sizes = opts.sizes.split(",").map((x) => Number(x));
      const modes = opts.modes.split(",") as ("live" | "diff" | "full")[];
      const workloads = opts.workloads.split(",") as ("idle" | "dirty")[];
      const s = spinner("starting a daemon");
      const { controller, stop } = await startBenchDaemon();
      const run = randomBytes(3).toString("hex");
      const rows: Record<string, unknown>[] = [];
      const cleanupTags: string[] = [];
      try {
        for (const memoryMib of sizes) {
          const base = `bench-br-${run}-${memoryMib}`;
          s.text = `snapshot ${memoryMib} MiB`;
          await controller.createSnapshot({ tag: base, memory_mib: memoryMib });
          cleanupTags.push(base);
          for (const workload of workloads) {
            const source = (await controller.createSandboxes({ snapshot_tag: base, n: 1 })).sandboxes[0]!.id;
            if (workload === "dirty") {
              // Rewrite a quarter of guest RAM on tmpfs in a loop, detached from the exec.
              const mib = Math.floor(memoryMib / 4);
              await controller.exec(source, {
                cmd: `setsid sh -c 'while true; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=${mib} 2>/dev/null; done' </dev/null >/dev/null 2>&1 &`,
              });
              await new Promise((r) => setTimeout(r, 1500));
            }
            for (const mode of modes) {
              const pauses: number[] = [];
              const totals: number[] = [];
              for (let i = 0; i < opts.samples; i++) {
                s.text = `${memoryMib} MiB ${workload} ${mode}: branch ${i + 1}/${opts.samples}`;
                const tag = `${base}-${workload}-${mode}-${i}`;
                const res = await controller.branchSandbox(source, { tag, mode });
                pauses.push(res.pause_ms);
                totals.push(res.total_ms ?? Number.NaN);
                await controller.deleteSnapshot(tag, { force: true });
              }
              const returns: number[] = [];
              for (let i = 0; i < opts.nowaitSamples; i++) {
                s.text = `${memoryMib} MiB ${workload} ${mode}: wait:false ${i + 1}/${opts.nowaitSamples}`;
                const tag = `${base}-${workload}-${mode}-nw${i}`;
                const t0 = performance.now();
                await controller.branchSandbox(source, { tag, mode, wait: false });
                returns.push(performance.now() - t0);
                await controller.waitForSnapshot(tag);
                await controller.deleteSnapshot(tag, { force: true });
              }
              rows.push({
                mode,
                memory_mib: memoryMib,
                workload,
                pause_ms_p50: round1(percentile(pauses, 50)),
                pause_ms_p90: round1(percentile(pauses, 90)),
                pause_ms_max: round1(Math.max(...pauses)),
                total_ms_p50: round1(percentile(totals, 50)),
                nowait_return_ms_p50: round1(percentile(returns, 50)),
                samples: pauses.length,
              });
            }
            await controller.deleteSandbox(source);
          }
        }
        s.stop();
        const result = { accel: (await chooseAccel()).accel, cpus: os.cpus().length, results: rows };
        writeResult("branch", result);
        if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
        else {
          const table = plainTable([
            "MODE",
            "MEMORY",
            "WORKLOAD",
            "PAUSE p50",
            "PAUSE p90",
            "PAUSE max",
            "TOTAL p50",
            "NO-WAIT RETURN p50",
          ]);
          for (const r of rows)
            table.push([
              r.mode,
              `${r.memory_mib} MiB`,
              r.workload,
              r.pause_ms_p50,
              r.pause_ms_p90,
              r.pause_ms_max,
              r.total_ms_p50,
              r.nowait_return_ms_p50,
            ] as string[]);
          process.stdout.write(`${table.toString()}\n`);
        }
      } finally {
        s.stop();
        for (const tag of cleanupTags) await controller.deleteSnapshot(tag, { force: true }).catch(() => {});
        await stop();
      }
    });

  bench
    .command("fanout")
    .description("the headline workload: N children each evaluating `import numpy; numpy.zeros(5).tolist()` in a warm Python worker")
    .option("-n, --count <n>", "children", parseIntOption("-n"), 100)
    .option("--image <name>", "image with Python", "python")
    .option("--concurrency <n>", "restores in flight", parseIntOption("--concurrency"), 8)
    .option("--json", "print JSON")
    .action(async (opts: { count: number; image: string; concurrency: number; json?: boolean }) => {
      const n = opts.count;
      if (n < 1 || n > 1000) throw new ForkdError("bad_request", "-n must be from 1 to 1000");
      const code = "import numpy; numpy.zeros(5).tolist()";
      const expected = JSON.stringify([0, 0, 0, 0, 0]);
      const tag = `bench-fanout-${randomBytes(4).toString("hex")}`;
      const s = spinner(`snapshot of image ${opts.image}`);
      const ids: string[] = [];
      try {
        await createSnapshot({ tag, image: opts.image, onProgress: (step) => (s.text = `snapshot: ${step}`) });
        s.text = `fan-out of ${n}`;
        let answered = 0;
        const evalMs: number[] = [];
        const started = performance.now();
        const answers: Promise<boolean>[] = [];
        await forkSandboxes({
          tag,
          n,
          concurrency: opts.concurrency,
          keepAgent: (id, agent) => {
            ids.push(id);
            answers.push(
              (async () => {
                try {
                  const t0 = performance.now();
                  const res = await agent.eval(code, { language: "python", timeoutMs: 120_000 });
                  evalMs.push(performance.now() - t0);
                  s.text = `fan-out: ${++answered}/${n} answered`;
                  return JSON.stringify(res.value) === expected;
                } catch {
                  return false;
                } finally {
                  agent.close();
                }
              })(),
            );
          },
        });
        const ok = (await Promise.all(answers)).filter(Boolean).length;
        const wallMs = performance.now() - started;
        s.text = "letting children settle, then reading their memory";
        await new Promise((r) => setTimeout(r, 2000));
        const { listSandboxes } = await import("@forkd/core");
        const rows = listSandboxes().filter((r) => ids.includes(r.id));
        const pss = rows.map((r) => pssBytes(r.pid) ?? 0);
        // One warm child: the worker's eval against a cold `python3 -c` of the same expression.
        const probe = await connectSandbox(ids[0]!);
        const warm: number[] = [];
        const cold: number[] = [];
        // Evals first: a cold interpreter in between would evict the warm path's translations.
        for (let i = 0; i < 30; i++) {
          s.text = `warm eval ${i + 1}/30`;
          const t0 = performance.now();
          await probe.eval(code, { language: "python" });
          warm.push(performance.now() - t0);
        }
        for (let i = 0; i < 3; i++) {
          s.text = `cold python3 -c ${i + 1}/3`;
          const t0 = performance.now();
          await probe.exec({ argv: ["python3", "-c", "import numpy; print(numpy.zeros(5).tolist())"] });
          cold.push(performance.now() - t0);
        }
        probe.close();
        s.stop();
        const result = {
          accel: (await chooseAccel()).accel,
          cpus: os.cpus().length,
          image: opts.image,
          n,
          ok,
          wall_ms: round1(wallMs),
          first_eval_ms_p50: round1(percentile(evalMs, 50)),
          eval_ms_p50: round1(percentile(warm, 50)),
          exec_python_ms_p50: round1(percentile(cold, 50)),
          pss_per_child_mib: round1(pss.reduce((a, b) => a + b, 0) / Math.max(1, pss.length) / MIB),
        };
        writeResult("fanout", result);
        if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
        else for (const [k, v] of Object.entries(result)) process.stdout.write(`${k.padEnd(20)} ${v}\n`);
        if (ok < n) process.exitCode = 1;
      } finally {
        s.stop();
        await Promise.all(ids.map((id) => killSandbox(id).catch(() => {})));
        await removeSnapshot(tag, { force: true }).catch(() => {});
      }
    });
}
