import { listPools, listSandboxes, listSnapshots } from "@forkd/core";
import client from "prom-client";

export type Metrics = ReturnType<typeof createMetrics>;

export function createMetrics(version: string) {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry, prefix: "forkd_daemon_" });
  new client.Gauge({
    name: "forkd_sandboxes_active",
    help: "Sandboxes whose VMM is running",
    registers: [registry],
    collect() {
      this.set(listSandboxes().filter((s) => s.alive).length);
    },
  });
  new client.Gauge({
    name: "forkd_snapshots_total",
    help: "Registered snapshots",
    registers: [registry],
    async collect() {
      this.set((await listSnapshots()).length);
    },
  });
  const branchesInFlight = new client.Gauge({
    name: "forkd_branches_in_flight",
    help: "BRANCH operations in progress",
    registers: [registry],
  });
  const spawnSeconds = new client.Histogram({
    name: "forkd_spawn_seconds",
    help: "Restore of one child, from VMM start to its first answer",
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
    registers: [registry],
  });
  const callSeconds = new client.Histogram({
    name: "forkd_call_seconds",
    help: "Agent calls through the API, by kind",
    labelNames: ["kind"],
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30],
    registers: [registry],
  });
  new client.Gauge({ name: "forkd_build_info", help: "forkd build", labelNames: ["version", "node"], registers: [registry] })
    .labels(version, process.version)
    .set(1);
  const branchPauseSeconds = new client.Histogram({
    name: "forkd_branch_pause_seconds",
    help: "How long a BRANCH paused its source, by mode",
    labelNames: ["mode"],
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5],
    registers: [registry],
  });
  new client.Gauge({
    name: "forkd_pool_ready",
    help: "Pooled children restored and answering, waiting to be handed out, by snapshot tag",
    labelNames: ["tag"],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of listPools()) this.labels(p.tag).set(p.ready);
    },
  });
  new client.Gauge({
    name: "forkd_pool_size",
    help: "Pooled children wanted, by snapshot tag",
    labelNames: ["tag"],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of listPools()) this.labels(p.tag).set(p.size);
    },
  });
  const poolClaimSeconds = new client.Histogram({
    name: "forkd_pool_claim_seconds",
    help: "Handing out one pooled child: taking it from the pool and its fresh identity answered",
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [registry],
  });
  const forkLiveSeconds = new client.Histogram({
    name: "forkd_fork_live_capture_seconds",
    help: "Live fork-to-many: from the request until the capture of the running source could be forked from",
    buckets: [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5],
    registers: [registry],
  });
  return { registry, branchesInFlight, branchPauseSeconds, spawnSeconds, callSeconds, poolClaimSeconds, forkLiveSeconds };
}
