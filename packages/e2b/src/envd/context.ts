// What the envd plane needs from the daemon, and what it shares between its services:
// the sandbox a request is for, its agent, the user a call runs as, the streams open
// on each sandbox (ended at once when the sandbox goes), and the mapping of errors
// onto Connect's codes.
import { timingSafeEqual } from "node:crypto";
import type { IncomingMessage } from "node:http";
import type { AgentClient } from "@forkd/core";
import { AgentCallError } from "@forkd/core";
import { ConnectError } from "./connect.js";

/** A sandbox as the envd plane sees it. */
export type EnvdSandbox = {
  id: string;
  /** Only a running sandbox answers; a paused or stopping one is 502 on /health and `unavailable` elsewhere. */
  running: boolean;
  /** E2B's envdAccessToken: when set, every call but /health must carry it (or a signature made with it). */
  accessToken?: string;
  /** The sandbox's envVars (given at create), under each process's own envs. */
  envVars: Record<string, string>;
  /** Guest memory, which bounds one write or stdin payload (core's checkGuestPayload). */
  memoryMib: number;
};

export type EnvdDeps = {
  /** The sandbox with this id, or undefined when there is none (killed, never existed). */
  sandbox(id: string): EnvdSandbox | undefined;
  /** Sandboxes that have an access token: a signed /files URL names none, its signature does. */
  securedSandboxes(): Iterable<EnvdSandbox>;
  /** The sandbox's open agent channel. */
  agent(id: string): Promise<AgentClient>;
};

/** The user a call runs as when it names none (E2B's templates' default). */
export const DEFAULT_USER = "user";
const USER_RE = /^[a-z_][a-z0-9_.-]{0,31}$/i;

/** The user of a call: HTTP Basic `user:` as the SDK sends it, or the default. */
export function userOf(req: IncomingMessage): string {
  const auth = req.headers.authorization;
  if (auth === undefined) return DEFAULT_USER;
  const m = /^Basic ([A-Za-z0-9+/=]{1,200})$/.exec(auth);
  if (!m) throw new ConnectError("invalid_argument", "Authorization must be Basic with a user name");
  const decoded = Buffer.from(m[1]!, "base64").toString("utf8");
  const name = decoded.includes(":") ? decoded.slice(0, decoded.indexOf(":")) : decoded;
  if (name === "") return DEFAULT_USER;
  if (!USER_RE.test(name)) throw new ConnectError("invalid_argument", "the user name in Authorization is not a valid user name");
  return name;
}

export function checkUserName(name: string): string {
  if (!USER_RE.test(name)) throw new ConnectError("invalid_argument", `'${name.slice(0, 40)}' is not a valid user name`);
  return name;
}

export function tokensEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** The request's X-Access-Token matches the sandbox's (true when the sandbox has none). */
export function hasAccess(req: IncomingMessage, sandbox: EnvdSandbox): boolean {
  if (!sandbox.accessToken) return true;
  const given = req.headers["x-access-token"];
  return typeof given === "string" && tokensEqual(given, sandbox.accessToken);
}

/** An agent's or the daemon's error as the Connect code envd would answer with. */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof AgentCallError) {
    const message = err.message;
    switch (err.agentCode) {
      case "not_found":
        return new ConnectError("not_found", message);
      case "exists":
        return new ConnectError("already_exists", message);
      case "bad_request":
      case "not_a_directory":
      case "is_a_directory":
        return new ConnectError("invalid_argument", message);
      case "permission_denied":
        return new ConnectError("permission_denied", message);
      case "too_large":
      case "agent_busy":
        return new ConnectError("resource_exhausted", message);
      case "not_running":
        return new ConnectError("failed_precondition", message);
      case "timeout":
        return new ConnectError("deadline_exceeded", message);
      default:
        return new ConnectError("internal", message);
    }
  }
  const code = (err as { code?: unknown }).code;
  const message = err instanceof Error ? err.message : String(err);
  switch (code) {
    case "too_large":
      return new ConnectError("resource_exhausted", message);
    case "bad_request":
      return new ConnectError("invalid_argument", message);
    case "not_found":
    case "invalid_state":
    case "agent_error":
    case "vm_timeout":
      // The sandbox or its channel is gone or broken: to the SDK, the sandbox is not running.
      return new ConnectError("unavailable", `the sandbox is not answering: ${message}`);
    default:
      return new ConnectError("internal", message);
  }
}

/**
 * The streams open on each sandbox. Killing or pausing a sandbox ends them at once
 * (the daemon calls endSandboxStreams), rather than when the agent channel notices.
 */
export class OpenStreams {
  private readonly bySandbox = new Map<string, Set<(reason: ConnectError) => void>>();

  add(sandboxId: string, end: (reason: ConnectError) => void): () => void {
    let set = this.bySandbox.get(sandboxId);
    if (!set) {
      set = new Set();
      this.bySandbox.set(sandboxId, set);
    }
    set.add(end);
    return () => {
      set.delete(end);
      if (set.size === 0 && this.bySandbox.get(sandboxId) === set) this.bySandbox.delete(sandboxId);
    };
  }

  count(sandboxId: string): number {
    return this.bySandbox.get(sandboxId)?.size ?? 0;
  }

  endAll(sandboxId: string, why: string): void {
    const set = this.bySandbox.get(sandboxId);
    if (!set) return;
    this.bySandbox.delete(sandboxId);
    const reason = new ConnectError("unavailable", why);
    for (const end of set) end(reason);
  }
}
