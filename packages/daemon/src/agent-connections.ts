// The daemon's agent connections, one kept open per sandbox (hot pools of
// ready children are another thing: hot-pools.ts).
import { type AgentClient, connectSandbox, validateSandboxId, watchAgentHealth } from "@forkd/core";

/**
 * One persistent agent connection per sandbox. The virtio-serial chardev takes
 * one client at a time, and a guest with a host attached sleeps in a blocking
 * read instead of waiting for SIGIO, so the daemon keeps them open.
 */
export class AgentConnections {
  private readonly agents = new Map<string, Promise<AgentClient>>();

  /** `onUnhealthy` hears of every guest that breaks the protocol (its row is marked already). */
  constructor(private readonly onUnhealthy?: (id: string, reason: string) => void) {}

  /**
   * The agent of a sandbox for an API call. An open kept connection proves the
   * VMM is alive (it closes when QEMU exits), so the hot path skips the state
   * lookup; otherwise connecting goes through it and answers 404 for the unknown.
   */
  async forSandbox(id: string): Promise<AgentClient> {
    validateSandboxId(id);
    return this.get(id);
  }

  get(id: string): Promise<AgentClient> {
    const existing = this.agents.get(id);
    if (existing) {
      return existing.then(
        (agent) => (agent.isClosed ? this.connect(id) : agent),
        () => this.connect(id),
      );
    }
    return this.connect(id);
  }

  private connect(id: string): Promise<AgentClient> {
    // An unhealthy sandbox is refused here at once (409), so a hostile guest is never
    // reconnected to in a loop.
    const pending = connectSandbox(id, undefined, this.onUnhealthy);
    this.agents.set(id, pending);
    pending.catch(() => this.agents.delete(id));
    return pending;
  }

  /** Adopt a connection someone else opened (the fork path already has one). */
  adopt(id: string, agent: AgentClient): void {
    watchAgentHealth(id, agent, this.onUnhealthy);
    this.agents.set(id, Promise.resolve(agent));
  }

  drop(id: string): void {
    const existing = this.agents.get(id);
    this.agents.delete(id);
    existing?.then((a) => a.close()).catch(() => {});
  }

  closeAll(): void {
    for (const id of [...this.agents.keys()]) this.drop(id);
  }
}
