import fs from "node:fs";

/** A field of /proc/PID/smaps_rollup (Pss, Private_Dirty, Rss…) in bytes. */
export function smapsRollupBytes(pid: number, field: "Pss" | "Private_Dirty" | "Rss"): number | undefined {
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

/** CPU time (user + system) a process has used, in milliseconds. */
export function cpuTimeMs(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(fields[11]) + Number(fields[12]);
    return (ticks * 1000) / 100; // USER_HZ is 100 on Linux
  } catch {
    return undefined;
  }
}
