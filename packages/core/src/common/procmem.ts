import fs from "node:fs";

/** A field of /proc/PID/smaps_rollup (Pss, Private_Dirty, Rss…) in bytes. */
function smapsRollupBytes(pid: number, field: "Pss" | "Private_Dirty" | "Rss"): number | undefined {
  try {
    const text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
    const kb = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text)?.[1];
    return kb === undefined ? undefined : Number(kb) * 1024;
  } catch {
    return undefined;
  }
}

/** Proportional set size of a process in bytes: shared pages are split among the processes that map them. */
export function pssBytes(pid: number): number | undefined {
  return smapsRollupBytes(pid, "Pss");
}
