// What the E2B planes need from the daemon, passed in (the daemon imports this
// package, never the reverse): its agent connections, its admission ledger, the
// steps it adds to every fork, and its log. One E2bContext per daemon, shared by
// its unix-socket and TCP servers.
import { randomBytes } from "node:crypto";
import path from "node:path";
import type { AdmissionLedger, AgentClient, ForkChildResult } from "@forkd/core";
import { E2bSandboxes } from "./sandboxes.js";

/** The daemon's kept agent connections (daemon/src/agent-connections.ts), by forkd sandbox id. */
export type E2bAgents = {
  /** Validates the id, then the open connection (404 for an unknown sandbox). */
  forSandbox(forkdId: string): Promise<AgentClient>;
  adopt(forkdId: string, agent: AgentClient): void;
  drop(forkdId: string): void;
};

/** What the daemon adds to every fork (daemon/src/routes/fork-steps.ts `daemonForkSteps`). */
type E2bForkSteps = {
  admission: AdmissionLedger;
  around: <T>(work: () => Promise<T>) => Promise<T>;
  keepAgent: (id: string, agent: AgentClient) => void;
  onChild: (child: ForkChildResult) => void;
  killChild: (id: string) => Promise<void>;
};

export type E2bDaemonDeps = {
  /** $FORKD_HOME: E2B's records live in its e2b/ folder. */
  home: string;
  agents: E2bAgents;
  admission: AdmissionLedger;
  forkSteps: (onEachChild: (child: ForkChildResult) => void) => E2bForkSteps;
  log: (line: string) => void;
};

export class E2bContext {
  readonly sandboxes: E2bSandboxes;
  /** Signs paging tokens (X-Next-Token); per daemon process, so a restart invalidates old ones. */
  readonly pagingSecret = randomBytes(32);
  /** The daemon's TCP URL once it listens (what `forkd e2b env` prints as E2B_API_URL and E2B_SANDBOX_URL). */
  tcpUrl: string | undefined;

  constructor(readonly deps: E2bDaemonDeps) {
    this.sandboxes = new E2bSandboxes(path.join(deps.home, "e2b", "sandboxes"));
  }

  get agents(): E2bAgents {
    return this.deps.agents;
  }

  log(line: string): void {
    this.deps.log(`forkd daemon: e2b: ${line}`);
  }
}
