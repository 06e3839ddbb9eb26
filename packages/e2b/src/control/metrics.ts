// GET /sandboxes/:id/metrics: one sample now, from the host (the VMM's cgroup: CPU
// time) and the guest (/proc/meminfo and df of /, read through the agent). Every
// byte the guest sends is attacker input: the output is capped and parsed as numbers
// only, and a guest that answers nonsense gets zeros, never a daemon error.
import fs from "node:fs";
import path from "node:path";
import { cgroupDirs, getSandbox } from "@forkd/core";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";

const GUEST_PROBE = "cat /proc/meminfo; df -P -k /";
const MAX_PROBE_BYTES = 16 * 1024;
const PROBE_TIMEOUT_MS = 5000;

/** CPU time the cgroup has used, in microseconds (v2 cpu.stat, or v1 cpuacct.usage in ns). */
function cpuUsageUs(cgroup: string | null): number | undefined {
  for (const dir of cgroupDirs(cgroup)) {
    try {
      const m = /^usage_usec (\d+)$/m.exec(fs.readFileSync(path.join(dir, "cpu.stat"), "utf8"));
      if (m) return Number(m[1]);
    } catch {
      // not v2
    }
    try {
      return Number(fs.readFileSync(path.join(dir, "cpuacct.usage"), "utf8").trim()) / 1000;
    } catch {
      // not this hierarchy
    }
  }
  return undefined;
}

const lastCpu = new Map<string, { atMs: number; usageUs: number }>();

export type E2bMetric = {
  timestamp: string;
  timestampUnix: number;
  cpuUsedPct: number;
  cpuCount: number;
  memUsed: number;
  memTotal: number;
  memCache: number;
  diskUsed: number;
  diskTotal: number;
};

/** Parse what the guest printed; anything unexpected counts as 0. */
export function parseGuestProbe(text: string): {
  memTotal: number;
  memUsed: number;
  memCache: number;
  diskUsed: number;
  diskTotal: number;
} {
  const kib = (name: string) => {
    const m = new RegExp(`^${name}:\\s+(\\d{1,15}) kB$`, "m").exec(text);
    return m ? Number(m[1]) * 1024 : 0;
  };
  const memTotal = kib("MemTotal");
  const memAvailable = kib("MemAvailable");
  const df = /^\S+\s+(\d{1,15})\s+(\d{1,15})\s+\d{1,15}\s+\d{1,3}%\s+\/$/m.exec(text);
  return {
    memTotal,
    memUsed: Math.max(0, memTotal - memAvailable),
    memCache: kib("Cached"),
    diskTotal: df ? Number(df[1]) * 1024 : 0,
    diskUsed: df ? Number(df[2]) * 1024 : 0,
  };
}

export async function e2bMetrics(e2b: E2bContext, sandboxID: string): Promise<E2bMetric[]> {
  const record = e2b.sandboxes.require(sandboxID);
  // A paused sandbox runs nothing: E2B answers an empty series.
  if (!record.forkdId) return [];
  const row = getSandbox(record.forkdId);
  const now = Date.now();
  const usage = cpuUsageUs(row.cgroup);
  let cpuUsedPct = 0;
  if (usage !== undefined) {
    const before = lastCpu.get(record.forkdId) ?? { atMs: Date.parse(row.created_at) || record.startedAtMs, usageUs: 0 };
    const wallUs = Math.max(1, (now - before.atMs) * 1000);
    cpuUsedPct = Math.min(100, Math.max(0, ((usage - before.usageUs) / wallUs / Math.max(1, record.cpuCount)) * 100));
    lastCpu.set(record.forkdId, { atMs: now, usageUs: usage });
  }
  let probe = "";
  try {
    const agent = await e2b.agents.forSandbox(record.forkdId);
    const collect = (d: string | Buffer) => {
      if (probe.length < MAX_PROBE_BYTES) probe += String(d).slice(0, MAX_PROBE_BYTES - probe.length);
    };
    await agent.exec({ cmd: GUEST_PROBE, timeoutMs: PROBE_TIMEOUT_MS }, { onStdout: collect });
  } catch (err) {
    if ((err as { code?: string }).code === "sandbox_not_found") throw new E2bHttpError(404, `sandbox ${sandboxID} not found`);
    // The host side still answers: CPU from the cgroup, the guest's figures as zeros.
  }
  const guest = parseGuestProbe(probe);
  return [
    {
      timestamp: new Date(now).toISOString(),
      timestampUnix: Math.floor(now / 1000),
      cpuUsedPct: Math.round(cpuUsedPct * 100) / 100,
      cpuCount: record.cpuCount,
      ...guest,
      memTotal: guest.memTotal || record.memoryMB * 2 ** 20,
    },
  ];
}
