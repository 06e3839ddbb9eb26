// GET /v1/metrics/summary: the figures the dashboard charts (fork rate, spawn
// p50/p99, pool hand-out p50/p99, host memory, the shmem budget) and each sandbox's CPU and memory from
// its cgroup, as JSON. /metrics (Prometheus text) stays for scrapers.
import fs from "node:fs";
import path from "node:path";
import { type AdmissionLedger, cgroupDirs, listSandboxes, procStatFields, pssBytes, readCapacity, shmDir } from "@forkd/core";
import type { MetricsSummaryT } from "./schemas.js";

/** Events remembered for the percentiles and the rate (the newest; older ones drop out). */
const LATENCY_WINDOW = 512;
/** The rate is counted over this window. */
const RATE_WINDOW_MS = 60_000;

/** The last LATENCY_WINDOW events of one kind (child restores, pool hand-outs): when each finished and how long it took. */
export class LatencyWindow {
  private readonly at: number[] = [];
  private readonly ms: number[] = [];

  record(totalMs: number, now = Date.now()): void {
    this.at.push(now);
    this.ms.push(totalMs);
    if (this.at.length > LATENCY_WINDOW) {
      this.at.shift();
      this.ms.shift();
    }
  }

  /** Events in the last minute, and p50/p99 of the window (null before any). */
  summary(now = Date.now()): { per_min: number; p50_ms: number | null; p99_ms: number | null; seen: number } {
    const sorted = [...this.ms].sort((a, b) => a - b);
    const pct = (p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)]! : null);
    return {
      per_min: this.at.filter((t) => now - t <= RATE_WINDOW_MS).length,
      p50_ms: pct(0.5),
      p99_ms: pct(0.99),
      seen: sorted.length,
    };
  }
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

function readNumber(file: string): number | null {
  try {
    const n = Number(fs.readFileSync(file, "utf8").trim());
    return Number.isFinite(n) ? n : null;
  } catch {
    return null;
  }
}

/** Clock ticks a second in /proc/PID/stat (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

/**
 * A sandbox's memory and CPU time: from its cgroup where the host has the
 * controller (v2 files, then v1's), else from its VMM process (PSS from
 * smaps_rollup, utime + stime); null where neither answers.
 */
function sandboxUsage(cgroup: string | null, pid: number): { memory_bytes: number | null; cpu_usec: number | null } {
  const fromCgroup = cgroupUsage(cgroup);
  let cpu = fromCgroup.cpu_usec;
  if (cpu === null && pid > 0) {
    try {
      const fields = procStatFields(pid);
      cpu = ((Number(fields[11]) + Number(fields[12])) * 1_000_000) / USER_HZ;
    } catch {
      // exited meanwhile
    }
  }
  return {
    memory_bytes: fromCgroup.memory_bytes ?? (pid > 0 ? (pssBytes(pid) ?? null) : null),
    cpu_usec: Number.isFinite(cpu) ? cpu : null,
  };
}

function cgroupUsage(cgroup: string | null): { memory_bytes: number | null; cpu_usec: number | null } {
  let memory: number | null = null;
  let cpu: number | null = null;
  for (const dir of cgroupDirs(cgroup)) {
    memory ??= readNumber(path.join(dir, "memory.current")) ?? readNumber(path.join(dir, "memory.usage_in_bytes"));
    if (cpu === null) {
      const m = /^usage_usec (\d+)$/m.exec(readText(path.join(dir, "cpu.stat")));
      if (m) cpu = Number(m[1]);
      else {
        const ns = readNumber(path.join(dir, "cpuacct.usage"));
        if (ns !== null) cpu = Math.round(ns / 1000);
      }
    }
  }
  return { memory_bytes: memory, cpu_usec: cpu };
}

function spawnFields(s: ReturnType<LatencyWindow["summary"]>) {
  return { forks_per_min: s.per_min, spawn_p50_ms: s.p50_ms, spawn_p99_ms: s.p99_ms, spawns_seen: s.seen };
}

function poolClaimFields(s: ReturnType<LatencyWindow["summary"]>) {
  return { pool_claim_p50_ms: s.p50_ms, pool_claim_p99_ms: s.p99_ms, pool_claims_seen: s.seen };
}

export function metricsSummary(latency: { spawns: LatencyWindow; poolClaims: LatencyWindow }, admission: AdmissionLedger): MetricsSummaryT {
  const capacity = readCapacity();
  let shmTotal = 0;
  try {
    const st = fs.statfsSync(shmDir());
    shmTotal = st.blocks * st.bsize;
  } catch {
    // the staging dir may not exist yet: total unknown, shown as 0
  }
  const live = listSandboxes().filter((s) => s.alive);
  return {
    ts: new Date().toISOString(),
    sandboxes_active: live.length,
    ...spawnFields(latency.spawns.summary()),
    ...poolClaimFields(latency.poolClaims.summary()),
    host: {
      mem_total_bytes: capacity.memTotalBytes,
      mem_available_bytes: capacity.memAvailableBytes,
      shm_total_bytes: shmTotal,
      shm_free_bytes: capacity.shmFreeBytes,
      shm_reserved_bytes: admission.reserved().shmBytes,
    },
    sandboxes: Object.fromEntries(live.map((s) => [s.id, sandboxUsage(s.cgroup, s.pid)])),
  };
}
