// envd's process.Process service over the agent's background processes: Start is a
// proc_start then an attach from the first byte (output between the two is replayed
// from the guest's ring), Connect is an attach from now, List shows the running ones.
// A client that goes away only detaches (the process runs on, as in envd); the
// stream's deadline (Connect-Timeout-Ms) kills a process it started.
import type { IncomingMessage, ServerResponse } from "node:http";
import { MAX_EXEC_TIMEOUT_MS, type ProcExit, type ProcInfo } from "@forkd/agent/protocol";
import { type AgentClient, checkGuestPayload } from "@forkd/core";
import { ConnectError, parseKeepaliveMs, parseTimeoutMs, ServerStream, sendUnary } from "./connect.js";
import { type EnvdDeps, type EnvdSandbox, type OpenStreams, toConnectError, userOf } from "./context.js";

/** Streams one sandbox may hold open at once (the agent runs 64 calls at most). */
const MAX_STREAMS_PER_SANDBOX = 48;
const DEFAULT_KEEPALIVE_MS = 50_000;
const MAX_ARGS = 4096;
const MAX_ENVS = 1024;
const TAG_RE = /^[\x20-\x7e]{1,128}$/;

type Config = { cmd: string; args: string[]; envs: Record<string, string>; cwd?: string };

function asObject(value: unknown, name: string): Record<string, unknown> {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) throw new ConnectError("invalid_argument", `\`${name}\` must be an object`);
  return value as Record<string, unknown>;
}

function parseConfig(value: unknown): Config {
  const p = asObject(value, "process");
  if (typeof p.cmd !== "string" || p.cmd === "") throw new ConnectError("invalid_argument", "`process.cmd` must be a non-empty string");
  const args = p.args ?? [];
  if (!Array.isArray(args) || args.length > MAX_ARGS || !args.every((a) => typeof a === "string")) {
    throw new ConnectError("invalid_argument", `\`process.args\` must be at most ${MAX_ARGS} strings`);
  }
  const envs = asObject(p.envs, "process.envs");
  const entries = Object.entries(envs);
  if (entries.length > MAX_ENVS) throw new ConnectError("invalid_argument", `at most ${MAX_ENVS} envs`);
  for (const [k, v] of entries) {
    if (typeof v !== "string" || k === "" || k.includes("=") || k.includes("\0")) {
      throw new ConnectError("invalid_argument", `env '${k.slice(0, 40)}' must have a name without '=' and a string value`);
    }
  }
  if (p.cwd !== undefined && (typeof p.cwd !== "string" || p.cwd.includes("\0"))) {
    throw new ConnectError("invalid_argument", "`process.cwd` must be a string");
  }
  const cwd = typeof p.cwd === "string" && p.cwd !== "" ? p.cwd : undefined;
  return { cmd: p.cmd, args: args as string[], envs: envs as Record<string, string>, ...(cwd ? { cwd } : {}) };
}

type Selector = { pid: number } | { tag: string };

function parseSelector(value: unknown): Selector {
  const s = asObject(value, "process");
  if (s.pid !== undefined) {
    if (typeof s.pid !== "number" || !Number.isSafeInteger(s.pid) || s.pid <= 0) {
      throw new ConnectError("invalid_argument", "`process.pid` must be a positive integer");
    }
    return { pid: s.pid };
  }
  if (typeof s.tag === "string" && TAG_RE.test(s.tag)) return { tag: s.tag };
  throw new ConnectError("invalid_argument", "`process` must select a process by pid or tag");
}

async function findPid(agent: AgentClient, selector: Selector): Promise<number> {
  const list = await agent.procList();
  const found =
    "pid" in selector ? list.find((p) => p.pid === selector.pid && p.running) : list.find((p) => p.tag === selector.tag && p.running);
  if (!found) {
    // An exited process stays attachable for a while (its end still reaches a late Connect).
    const exited = "pid" in selector ? list.find((p) => p.pid === selector.pid) : list.find((p) => p.tag === selector.tag);
    if (exited) return exited.pid;
    throw new ConnectError("not_found", `process with ${"pid" in selector ? `pid ${selector.pid}` : `tag '${selector.tag}'`} not found`);
  }
  return found.pid;
}

async function runningPid(agent: AgentClient, selector: Selector): Promise<number> {
  const list = await agent.procList();
  const found =
    "pid" in selector ? list.find((p) => p.pid === selector.pid && p.running) : list.find((p) => p.tag === selector.tag && p.running);
  if (!found)
    throw new ConnectError("not_found", `process with ${"pid" in selector ? `pid ${selector.pid}` : `tag '${selector.tag}'`} not found`);
  return found.pid;
}

/** Go's name for a signal, as its os.ProcessState prints it ("signal: killed"). */
const GO_SIGNAL_TEXT: Record<string, string> = {
  SIGKILL: "killed",
  SIGTERM: "terminated",
  SIGINT: "interrupt",
  SIGHUP: "hangup",
  SIGQUIT: "quit",
  SIGUSR1: "user defined signal 1",
  SIGUSR2: "user defined signal 2",
  SIGSEGV: "segmentation fault",
  SIGABRT: "aborted",
  SIGPIPE: "broken pipe",
  SIGALRM: "alarm clock",
  SIGBUS: "bus error",
  SIGFPE: "floating point exception",
  SIGILL: "illegal instruction",
  SIGTRAP: "trace/breakpoint trap",
};

/** envd's end event for an exit: Go's exit code (-1 when signalled), whether it exited, its status text, and the error text when not 0. */
export function endEvent(exit: Pick<ProcExit, "exitCode" | "signal">): {
  exitCode: number;
  exited: boolean;
  status: string;
  error?: string;
} {
  if (exit.exitCode !== null) {
    const status = `exit status ${exit.exitCode}`;
    return { exitCode: exit.exitCode, exited: true, status, ...(exit.exitCode !== 0 ? { error: status } : {}) };
  }
  const name = exit.signal ?? "SIGKILL";
  const status = `signal: ${GO_SIGNAL_TEXT[name] ?? name.toLowerCase()}`;
  return { exitCode: -1, exited: false, status, error: status };
}

function processInfo(p: ProcInfo): Record<string, unknown> {
  const [cmd, ...args] = p.argv ?? ["/bin/sh", "-c", p.cmd ?? ""];
  return {
    config: { cmd, args, envs: p.env, ...(p.cwd ? { cwd: p.cwd } : {}) },
    pid: p.pid,
    ...(p.tag !== undefined ? { tag: p.tag } : {}),
  };
}

function signalOf(value: unknown): "SIGKILL" | "SIGTERM" {
  if (value === "SIGNAL_SIGKILL" || value === 9) return "SIGKILL";
  if (value === "SIGNAL_SIGTERM" || value === 15) return "SIGTERM";
  throw new ConnectError("invalid_argument", "`signal` must be SIGNAL_SIGKILL or SIGNAL_SIGTERM");
}

function base64Field(value: unknown, name: string): Buffer {
  if (typeof value !== "string" || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(value)) {
    throw new ConnectError("invalid_argument", `\`${name}\` must be base64 bytes`);
  }
  return Buffer.from(value, value.includes("-") || value.includes("_") ? "base64url" : "base64");
}

export type StreamCall = {
  req: IncomingMessage;
  res: ServerResponse;
  sandbox: EnvdSandbox;
  message: Record<string, unknown>;
  deps: EnvdDeps;
  streams: OpenStreams;
};

function checkStreamRoom({ sandbox, streams }: StreamCall): void {
  if (streams.count(sandbox.id) >= MAX_STREAMS_PER_SANDBOX) {
    throw new ConnectError(
      "resource_exhausted",
      `sandbox ${sandbox.id} already has ${MAX_STREAMS_PER_SANDBOX} streams open; close one first`,
    );
  }
}

/**
 * Open a stream tied to its sandbox: killed or paused, the sandbox ends it at once; its
 * deadline ends it with deadline_exceeded; keepalives flow meanwhile. `follow` does the
 * work and settles when the stream should end (with the error it should end with).
 */
export function openSandboxStream(
  call: StreamCall,
  keepalive: unknown,
  follow: (stream: ServerStream, signal: AbortSignal, deadline: AbortSignal) => Promise<void>,
  onDeadline?: () => void,
): void {
  const { req, res, sandbox, streams } = call;
  const timeoutMs = parseTimeoutMs(req.headers["connect-timeout-ms"]);
  checkStreamRoom(call);
  const stream = new ServerStream(res);
  const work = new AbortController();
  const deadline = new AbortController();
  let failure: ConnectError | undefined;
  const stop = (err?: ConnectError) => {
    if (work.signal.aborted) return;
    failure ??= err;
    work.abort();
  };
  stream.signal.addEventListener("abort", () => stop(), { once: true });
  const unregister = streams.add(sandbox.id, (reason) => {
    stop(reason);
    stream.end(reason);
  });
  const interval = parseKeepaliveMs(req.headers["keepalive-ping-interval"], DEFAULT_KEEPALIVE_MS);
  const ping = setInterval(() => stream.send(keepalive, true), interval);
  const timer =
    timeoutMs === undefined
      ? undefined
      : setTimeout(() => {
          deadline.abort();
          onDeadline?.();
          stop(new ConnectError("deadline_exceeded", `the call's deadline of ${timeoutMs} ms passed`));
        }, timeoutMs);
  follow(stream, work.signal, deadline.signal)
    .catch((err: unknown) => {
      if (!work.signal.aborted) failure ??= toConnectError(err);
    })
    .finally(() => {
      clearInterval(ping);
      if (timer) clearTimeout(timer);
      unregister();
      stream.end(failure);
    });
}

async function start(call: StreamCall): Promise<void> {
  const { req, sandbox, message, deps } = call;
  const config = parseConfig(message.process);
  if (message.pty !== undefined && message.pty !== null) {
    throw new ConnectError("unimplemented", "forkd does not serve PTY sessions (sandbox.pty); use commands");
  }
  if (message.tag !== undefined && (typeof message.tag !== "string" || !TAG_RE.test(message.tag))) {
    throw new ConnectError("invalid_argument", "`tag` must be 1-128 printable ASCII characters");
  }
  if (message.stdin !== undefined && typeof message.stdin !== "boolean")
    throw new ConnectError("invalid_argument", "`stdin` must be a boolean");
  const user = userOf(req);
  const timeoutMs = parseTimeoutMs(req.headers["connect-timeout-ms"]);
  // Refused before the process starts, not after: nobody would follow it.
  checkStreamRoom(call);
  const agent = await deps.agent(sandbox.id);
  let info: ProcInfo;
  try {
    info = await agent.procStart({
      argv: [config.cmd, ...config.args],
      env: { ...sandbox.envVars, ...config.envs },
      ...(config.cwd ? { cwd: config.cwd } : {}),
      user,
      // As envd: stdin is a pipe unless the request turns it off (the SDK always says which).
      stdinOpen: message.stdin !== false,
      // The deadline bounds the process even when its client has gone (the agent kills it then);
      // past the agent's longest timeout, the stream's own deadline kills it.
      ...(timeoutMs !== undefined && timeoutMs <= MAX_EXEC_TIMEOUT_MS ? { timeoutMs } : {}),
      ...(typeof message.tag === "string" ? { tag: message.tag } : {}),
    });
  } catch (err) {
    const e = toConnectError(err);
    // envd answers a cwd that does not exist with invalid_argument.
    throw e.code === "not_found" && /working directory/.test(e.message) ? new ConnectError("invalid_argument", e.message) : e;
  }
  const pid = info.pid;
  openSandboxStream(
    call,
    { event: { keepalive: {} } },
    async (stream, signal) => {
      stream.send({ event: { start: { pid } } });
      const exit = await agent.procAttach(pid, {
        signal,
        onStdout: (d) => stream.send({ event: { data: { stdout: d.toString("base64") } } }, true),
        onStderr: (d) => stream.send({ event: { data: { stderr: d.toString("base64") } } }, true),
      });
      stream.send({ event: { end: endEvent(exit) } });
    },
    // The deadline of a Start bounds the process itself, as in envd.
    () => {
      agent.procKill(pid, "SIGKILL").catch(() => undefined);
    },
  );
}

async function connect(call: StreamCall): Promise<void> {
  const { sandbox, message, deps } = call;
  const selector = parseSelector(message.process);
  parseTimeoutMs(call.req.headers["connect-timeout-ms"]);
  const agent = await deps.agent(sandbox.id);
  const pid = await findPid(agent, selector).catch((err: unknown) => {
    throw toConnectError(err);
  });
  openSandboxStream(call, { event: { keepalive: {} } }, async (stream, signal) => {
    stream.send({ event: { start: { pid } } });
    const exit = await agent.procAttach(pid, {
      signal,
      fromNow: true,
      onStdout: (d) => stream.send({ event: { data: { stdout: d.toString("base64") } } }, true),
      onStderr: (d) => stream.send({ event: { data: { stderr: d.toString("base64") } } }, true),
    });
    stream.send({ event: { end: endEvent(exit) } });
  });
}

type UnaryCall = {
  req: IncomingMessage;
  res: ServerResponse;
  sandbox: EnvdSandbox;
  message: Record<string, unknown>;
  deps: EnvdDeps;
};

async function unary(method: string, call: UnaryCall): Promise<unknown> {
  const { sandbox, message, deps } = call;
  const agent = await deps.agent(sandbox.id);
  switch (method) {
    case "List": {
      const list = await agent.procList();
      return { processes: list.filter((p) => p.running).map(processInfo) };
    }
    case "SendInput": {
      const pid = await runningPid(agent, parseSelector(message.process));
      const input = asObject(message.input, "input");
      if (input.pty !== undefined) throw new ConnectError("unimplemented", "forkd does not serve PTY sessions; send stdin");
      const data = base64Field(input.stdin ?? "", "input.stdin");
      checkGuestPayload("stdin", data.length, sandbox.memoryMib);
      await agent.procStdin(pid, data, false);
      return {};
    }
    case "CloseStdin": {
      const pid = await runningPid(agent, parseSelector(message.process));
      try {
        await agent.procStdin(pid, Buffer.alloc(0), true);
      } catch (err) {
        // Closing a stdin already closed is done, as in envd.
        if (toConnectError(err).code !== "failed_precondition") throw err;
      }
      return {};
    }
    case "SendSignal": {
      const pid = await runningPid(agent, parseSelector(message.process));
      try {
        await agent.procKill(pid, signalOf(message.signal));
      } catch (err) {
        // It exited between the lookup and the signal: envd no longer knows it either.
        if (toConnectError(err).code === "failed_precondition") throw new ConnectError("not_found", `process ${pid} has exited`);
        throw err;
      }
      return {};
    }
    case "Update": {
      await runningPid(agent, parseSelector(message.process));
      if (message.pty !== undefined && message.pty !== null) throw new ConnectError("unimplemented", "forkd does not serve PTY sessions");
      return {};
    }
    default:
      throw new ConnectError("unimplemented", `process.Process/${method} is not served`);
  }
}

const PROCESS_STREAMS = new Set(["Start", "Connect"]);
const PROCESS_UNARY = new Set(["List", "SendInput", "CloseStdin", "SendSignal", "Update"]);

export function isProcessMethod(method: string): "unary" | "server_stream" | undefined {
  if (PROCESS_STREAMS.has(method)) return "server_stream";
  if (PROCESS_UNARY.has(method)) return "unary";
  return undefined;
}

export async function serveProcess(method: string, call: StreamCall): Promise<void> {
  if (method === "Start") return start(call);
  if (method === "Connect") return connect(call);
  sendUnary(call.res, await unary(method, call));
}
