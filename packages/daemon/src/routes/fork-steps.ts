// What the daemon adds to every fork, from a snapshot or live (core's
// fork-policy.ts decides the rest, the same as the CLI without a daemon).
import { type AgentClient, type ForkChildResult, killSandbox } from "@forkd/core";
import type { ServerContext } from "./context.js";

/**
 * Its admission ledger, its hot pools stepping aside while a user's fork is in
 * flight, the agent connection it keeps for each child, the spawn metric, and a
 * rollback that drops a killed child's connection with it.
 */
export function daemonForkSteps(ctx: ServerContext, onEachChild: (child: ForkChildResult) => void) {
  return {
    admission: ctx.admission,
    around: <T>(work: () => Promise<T>) => ctx.hotPools.userFork(work),
    keepAgent: (id: string, agent: AgentClient) => ctx.agents.adopt(id, agent),
    onChild: (child: ForkChildResult) => {
      onEachChild(child);
      if (!child.ok) return;
      ctx.metrics.spawnSeconds.observe(child.timings.totalMs / 1000);
      ctx.spawns.record(child.timings.totalMs);
    },
    killChild: async (id: string) => {
      ctx.agents.drop(id);
      await killSandbox(id);
    },
  };
}
