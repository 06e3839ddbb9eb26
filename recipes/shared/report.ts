// What every recipe's example shares: its command line (--json, --n N), timing,
// and how it prints its numbers (a table for people, one JSON object for
// `forkd bench recipes`), with the machine they were measured on.
import fs from "node:fs";
import os from "node:os";

/**
 * How long the examples' sandboxes may live: the SDK's default (5 minutes, as
 * E2B's) kills a sandbox mid-measurement on a loaded TCG host.
 */
export const SANDBOX_LIFETIME_MS = 30 * 60_000;

export type ExampleArgs = { json: boolean; n: number | undefined };

export function exampleArgs(argv = process.argv.slice(2)): ExampleArgs {
  let json = false;
  let n: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--json") json = true;
    else if (arg === "--n") {
      n = Number(argv[++i]);
      if (!Number.isInteger(n) || n < 1 || n > 64) throw new Error("--n takes an integer from 1 to 64");
    } else throw new Error(`unknown argument ${arg}; the examples take --json and --n N`);
  }
  return { json, n };
}

export async function timed<T>(work: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const started = performance.now();
  const value = await work();
  return { value, ms: performance.now() - started };
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

export function round(value: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** The host the numbers come from: they mean little without it (TCG vs KVM, cores, load). */
export function machine(): { cpu_model: string; cpus: number; load_1m: number } {
  const cpuinfo = fs.readFileSync("/proc/cpuinfo", "utf8");
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? "unknown";
  return { cpu_model: model, cpus: os.cpus().length, load_1m: round(os.loadavg()[0] ?? 0, 2) };
}

/** Print the result: `rows` as an aligned table, or `numbers` (and the machine) as one JSON line. */
export function report(
  args: ExampleArgs,
  title: string,
  rows: readonly (readonly [string, string])[],
  numbers: Record<string, number | string | boolean>,
): void {
  if (args.json) {
    process.stdout.write(`${JSON.stringify({ ...numbers, ...machine() })}\n`);
    return;
  }
  const m = machine();
  const width = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(`${title}\n`);
  for (const [k, v] of rows) process.stdout.write(`  ${k.padEnd(width)}  ${v}\n`);
  process.stdout.write(`  ${"machine".padEnd(width)}  ${m.cpu_model}, ${m.cpus} CPUs, load ${m.load_1m}\n`);
}

export function ms(value: number): string {
  return value >= 10_000 ? `${(value / 1000).toFixed(1)} s` : `${value.toFixed(0)} ms`;
}
