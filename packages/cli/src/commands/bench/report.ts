// What every benchmark shares: the machine beside each figure, percentiles, and
// one way to print (a table, or JSON) and to keep the result (FORKD_BENCH_DIR).
import fs from "node:fs";
import os from "node:os";
import { type Accel, chooseAccel, setting } from "@forkd/core";
import { percentile, round1 } from "../../stats.js";
import { plainTable } from "../../ui.js";

export { percentile, round1 };

export const MIB = 2 ** 20;

export type Machine = { cpu_model: string; cpus: number; accel: Accel };

/** The CPU model and accel mode: TCG speed differs ~3× between our machines, so no figure goes without them. */
export async function machine(accel?: Accel): Promise<Machine> {
  return { cpu_model: os.cpus()[0]?.model.trim() ?? "unknown", cpus: os.cpus().length, accel: accel ?? (await chooseAccel()).accel };
}

/** p50 of one timing across results, rounded for the report. */
export function p50(values: number[]): number {
  return round1(percentile(values, 50));
}

/** A result as a two-column table of its plain fields (nested ones are printed by the benchmark itself). */
export function fieldsTable(result: Record<string, unknown>): string {
  const table = plainTable(["FIELD", "VALUE"]);
  for (const [key, value] of Object.entries(result)) {
    if (value === null || typeof value !== "object") table.push([key, String(value)]);
  }
  return table.toString();
}

/**
 * Keep the result as FORKD_BENCH_DIR/NAME.json (when set) and print it: one JSON
 * line with --json, otherwise `render` (the plain fields by default).
 */
export function emit(name: string, result: Record<string, unknown>, opts: { json?: boolean }, render = fieldsTable): void {
  const dir = setting("benchDir");
  if (dir) {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(`${dir}/${name}.json`, `${JSON.stringify(result, null, 2)}\n`);
  }
  process.stdout.write(opts.json ? `${JSON.stringify(result)}\n` : `${render(result)}\n`);
}
