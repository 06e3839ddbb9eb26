import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { statSync } from "node:fs";
import { type ExecRequest, type ExecResult, MAX_EXEC_TIMEOUT_MS } from "../protocol.js";
import { AgentOpError } from "./errors.js";

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

export type ChunkSink = (stream: "stdout" | "stderr", data: Buffer) => void;

/** How exec output waits for a slow host: the transport says when its queue is full and when it drained. */
export type OutputFlow = { full: () => boolean; drained: () => Promise<void> };

export function validateExec(request: ExecRequest): { file: string; args: string[] } {
  const { argv, cmd } = request;
  if ((argv === undefined) === (cmd === undefined)) {
    throw new AgentOpError("bad_request", "exec takes exactly one of `argv` (array) or `cmd` (shell string)");
  }
  if (argv !== undefined) {
    if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === "string")) {
      throw new AgentOpError("bad_request", "`argv` must be a non-empty array of strings");
    }
    if (argv[0] === "") throw new AgentOpError("bad_request", "`argv[0]` must name a program");
    return { file: argv[0]!, args: argv.slice(1) };
  }
  if (typeof cmd !== "string" || cmd.trim() === "") {
    throw new AgentOpError("bad_request", "`cmd` must be a non-empty shell string");
  }
  return { file: "/bin/sh", args: ["-c", cmd] };
}

export function validateTimeout(timeoutMs: unknown): number | undefined {
  if (timeoutMs === undefined) return undefined;
  if (typeof timeoutMs !== "number" || !Number.isInteger(timeoutMs) || timeoutMs <= 0 || timeoutMs > MAX_EXEC_TIMEOUT_MS) {
    throw new AgentOpError("bad_request", `\`timeoutMs\` must be an integer from 1 to ${MAX_EXEC_TIMEOUT_MS}`);
  }
  return timeoutMs;
}

export function validateEnv(env: unknown): Record<string, string> {
  if (env === undefined) return {};
  if (typeof env !== "object" || env === null || Array.isArray(env)) {
    throw new AgentOpError("bad_request", "`env` must be an object of string values");
  }
  for (const [key, value] of Object.entries(env)) {
    if (typeof value !== "string" || key === "" || key.includes("=") || key.includes("\0")) {
      throw new AgentOpError("bad_request", `env entry '${key}' must have a name without '=' and a string value`);
    }
  }
  return env as Record<string, string>;
}

export const DEFAULT_ENV = { PATH: DEFAULT_PATH, HOME: "/root", TERM: "dumb", LANG: "C.UTF-8" };

// A command is over when its own process has exited and its output has been read.
// Its pipes reach EOF only when every holder closes them, and a background child it
// left running (`nohup server &`) may hold them for ever: after the exit, output
// that has stopped for EXIT_QUIET_MS (or EXIT_GRACE_MS in all) is taken as complete.
const EXIT_QUIET_MS = 100;
const EXIT_GRACE_MS = 2000;
// Pipes still held by what finished commands left behind are read and discarded, so
// those writers never die of SIGPIPE; past this many, further ones are closed instead.
const MAX_LINGERING_PIPES = 256;
let lingeringPipes = 0;

/** What an exited child's pipes do once its caller has its answer. */
export function drainLeftovers(child: ChildProcessWithoutNullStreams): void {
  const open = (s: { destroyed: boolean; readableEnded: boolean }) => !s.destroyed && !s.readableEnded;
  if (!open(child.stdout) && !open(child.stderr)) return;
  child.stdout.removeAllListeners("data");
  child.stderr.removeAllListeners("data");
  if (lingeringPipes >= MAX_LINGERING_PIPES) {
    child.stdout.destroy();
    child.stderr.destroy();
    return;
  }
  lingeringPipes++;
  child.once("close", () => lingeringPipes--);
  child.stdout.resume();
  child.stderr.resume();
}

/**
 * Call `settled` once `child` has exited and its output is in: at its `close`, or when
 * its pipes have gone quiet after the exit. `lastOutputAt` is when data last arrived;
 * `paused` says output is held back by the reader (the quiet clock does not run then).
 */
export function whenExitSettled(
  child: ChildProcessWithoutNullStreams,
  lastOutputAt: () => number,
  settled: (code: number | null, signal: NodeJS.Signals | null) => void,
  paused: () => boolean = () => false,
): void {
  let done = false;
  let timer: NodeJS.Timeout | undefined;
  const finish = (code: number | null, signal: NodeJS.Signals | null) => {
    if (done) return;
    done = true;
    if (timer) clearTimeout(timer);
    settled(code, signal);
  };
  child.on("close", (code, signal) => finish(code, signal));
  child.on("exit", (code, signal) => {
    const exitedAt = performance.now();
    const check = () => {
      timer = undefined;
      const now = performance.now();
      if (!paused() && (now - Math.max(lastOutputAt(), exitedAt) >= EXIT_QUIET_MS || now - exitedAt >= EXIT_GRACE_MS)) {
        finish(code, signal);
        return;
      }
      timer = setTimeout(check, EXIT_QUIET_MS / 2);
    };
    if (!done) timer = setTimeout(check, EXIT_QUIET_MS / 2);
  });
}

/**
 * Run a process in its own process group so a timeout or cancel kills everything it
 * started. Output streams back as chunks while it runs.
 */
export function runExec(request: ExecRequest, signal: AbortSignal, onChunk: ChunkSink, flow?: OutputFlow): Promise<ExecResult> {
  const { file, args } = validateExec(request);
  const timeoutMs = validateTimeout(request.timeoutMs);
  const env = { ...DEFAULT_ENV, ...validateEnv(request.env) };
  const started = performance.now();
  return new Promise((resolve, reject) => {
    let timedOut = false;
    let settled = false;
    const child = spawn(file, args, {
      cwd: request.cwd ?? "/root",
      env,
      detached: true,
      stdio: ["pipe", "pipe", "pipe"],
    });
    const killGroup = () => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        child.kill("SIGKILL");
      }
    };
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            killGroup();
          }, timeoutMs);
    const onAbort = () => killGroup();
    signal.addEventListener("abort", onAbort, { once: true });
    const finish = (result: ExecResult | Error) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      if (result instanceof Error) reject(result);
      else resolve(result);
    };
    // Output faster than the port drains stops the process on a full pipe instead of
    // piling up in the agent: memory stays bounded and a cancel finds little queued.
    let paused = false;
    let lastOutputAt = 0;
    const onData = (stream: "stdout" | "stderr") => (data: Buffer) => {
      // After the answer, a chunk for this call would break the protocol.
      if (settled) return;
      lastOutputAt = performance.now();
      onChunk(stream, data);
      if (!flow || paused || !flow.full()) return;
      paused = true;
      child.stdout.pause();
      child.stderr.pause();
      const resume = () => {
        paused = false;
        child.stdout.resume();
        child.stderr.resume();
      };
      flow.drained().then(resume, (err: Error) => {
        // Output must not stay paused: the command would block on a full pipe.
        console.error(`forkd-agent: exec output flow: ${err.message}`);
        resume();
      });
    };
    child.stdout.on("data", onData("stdout"));
    child.stderr.on("data", onData("stderr"));
    child.on("error", (err: NodeJS.ErrnoException) => {
      const durationMs = performance.now() - started;
      // Mirror a shell: a missing program is exit 127, an unexecutable one 126.
      if (err.code === "ENOENT" && request.cwd !== undefined && !cwdExists(request.cwd)) {
        finish(new AgentOpError("not_found", `working directory does not exist: ${request.cwd}`));
      } else if (err.code === "ENOENT") {
        onChunk("stderr", Buffer.from(`forkd: ${file}: command not found\n`));
        finish({ exitCode: 127, signal: null, timedOut: false, durationMs });
      } else if (err.code === "EACCES") {
        onChunk("stderr", Buffer.from(`forkd: ${file}: permission denied\n`));
        finish({ exitCode: 126, signal: null, timedOut: false, durationMs });
      } else {
        finish(new AgentOpError("io_error", `could not start ${file}: ${err.message}`));
      }
    });
    whenExitSettled(
      child,
      () => lastOutputAt,
      (code, sig) => {
        const durationMs = performance.now() - started;
        if (signal.aborted && !timedOut) finish(new AgentOpError("cancelled", "exec was cancelled by the host"));
        else finish({ exitCode: code, signal: sig, timedOut, durationMs });
        drainLeftovers(child);
      },
      () => paused,
    );
    child.stdin.on("error", () => {
      // The process may exit without reading its stdin; that is not our error.
    });
    if (request.stdin !== undefined) child.stdin.end(Buffer.from(request.stdin, "base64"));
    else child.stdin.end();
  });
}

function cwdExists(cwd: string): boolean {
  try {
    return statSync(cwd).isDirectory();
  } catch {
    return false;
  }
}
