import { ForkdError } from "../common/errors.js";
import { runtimePaths } from "../vmm/plan.js";
import { AgentClient } from "./agent-client.js";

/**
 * Probe the agent until it answers: early probes are queued until the guest opens
 * its port. The probe is a ping unless the caller names another idempotent call
 * (a restored child uses its identity call, saving a round trip under TCG).
 */
export async function waitForAgent(
  socketPath: string,
  timeoutMs: number,
  runDir: string,
  signal?: AbortSignal,
  probe: (agent: AgentClient, timeoutMs: number) => Promise<unknown> = (agent, ms) => agent.ping({ timeoutMs: ms }),
  connected?: AgentClient,
): Promise<AgentClient> {
  const deadline = Date.now() + timeoutMs;
  const agent = connected ?? (await AgentClient.connect(socketPath, { timeoutMs }));
  for (;;) {
    signal?.throwIfAborted();
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      agent.close();
      throw new ForkdError(
        "vm_timeout",
        `the guest agent did not answer within ${timeoutMs} ms; the guest console log is ${runtimePaths(runDir).console}`,
        { console: runtimePaths(runDir).console },
      );
    }
    try {
      await probe(agent, Math.min(remaining, 2000));
      return agent;
    } catch (err) {
      if (agent.isClosed) throw err;
    }
  }
}
