#!/usr/bin/env node
// Runs every benchmark, writes JSON under bench/results/, prints a table.
// Each benchmark measures its baseline in the same invocation (see README).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const resultsDir = path.join(root, "bench", "results");
fs.mkdirSync(resultsDir, { recursive: true });
const cli = path.join(root, "packages/cli/dist/main.js");
const n = process.env.FORKD_BENCH_N ?? "100";

const benches = [
  ["boot", ["bench", "boot", "--json", "--runs", "5"]],
  ["spawn", ["bench", "spawn", "--json", "-n", n]],
  ["api", ["bench", "api", "--json"]],
  ["branch", ["bench", "branch", "--json"]],
  ["fanout", ["bench", "fanout", "--json", "-n", n]],
  ["pool", ["bench", "pool", "--json", "-n", n]],
  ["fork-live", ["bench", "fork-live", "--json", "-n", "10"]],
  ["chain", ["bench", "chain", "--json"]],
  ["pack", ["bench", "pack", "--json"]],
  ["confine", ["bench", "confine", "--json"]],
];
const machine = {
  cpus: os.cpus().length,
  cpu_model: os.cpus()[0]?.model,
  mem_gib: Math.round(os.totalmem() / 2 ** 30),
  kernel: os.release(),
};
const rows = [];
let failed = false;
for (const [name, args] of benches) {
  process.stderr.write(`bench ${name}…\n`);
  const res = spawnSync(process.execPath, [cli, ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (res.status !== 0) {
    failed = true;
    process.stderr.write(`bench ${name} failed with ${res.status}\n${res.stdout}\n`);
    continue;
  }
  const result = { ...JSON.parse(res.stdout.trim().split("\n").at(-1)), machine, measured_at: new Date().toISOString() };
  fs.writeFileSync(path.join(resultsDir, `${name}.json`), `${JSON.stringify(result, null, 2)}\n`);
  for (const [k, v] of Object.entries(result)) if (typeof v !== "object") rows.push([name, k, v]);
  for (const row of result.results ?? []) {
    const { mode, memory_mib, workload, ...numbers } = row;
    rows.push([name, `${mode} ${memory_mib}MiB ${workload}`, JSON.stringify(numbers)]);
  }
}
const width = Math.max(...rows.map((r) => String(r[1]).length));
for (const [name, k, v] of rows) process.stdout.write(`${name.padEnd(6)} ${String(k).padEnd(width)} ${v}\n`);
process.stdout.write(`machine: ${machine.cpus} × ${machine.cpu_model}, ${machine.mem_gib} GiB, host kernel ${machine.kernel}\n`);
process.exitCode = failed ? 1 : 0;
