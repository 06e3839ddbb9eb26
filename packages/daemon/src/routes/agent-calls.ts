// Calls into a sandbox's guest agent: ping, exec (whole or streamed), eval, files.
import { AgentCallError, checkGuestPayload, ForkdError, getImage, getSandbox } from "@forkd/core";
import { z } from "zod";
import { boundedTimeout, noNulBytes } from "../request-checks.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";
import { openOutputStream } from "./output-stream.js";
import { startBackground } from "./processes.js";

const languageOfImage = new Map<string, "javascript" | "python">();

/** What eval runs when the caller does not say: the main runtime of the sandbox's image. */
async function mainLanguage(id: string): Promise<"javascript" | "python"> {
  const image = getSandbox(id).image;
  let language = languageOfImage.get(image);
  if (!language) {
    const runtimes = await getImage(image)
      .then((m) => m.runtimes)
      .catch(() => ["javascript"]);
    language = runtimes.includes("python") ? "python" : "javascript";
    languageOfImage.set(image, language);
  }
  return language;
}

export function registerAgentCallRoutes({ r, ctx, err }: RouteDeps): void {
  r.post("/v1/sandboxes/:id/ping", { schema: { params: S.IdParam, response: { 200: S.PingResponse, ...err } } }, async (request) => {
    const agent = await ctx.agents.forSandbox(request.params.id);
    const language = await mainLanguage(request.params.id);
    const t0 = performance.now();
    const pong = await agent.ping({ timeoutMs: 10_000 });
    return {
      pong: true as const,
      agent_lang: language === "python" ? "python" : "node",
      warmup_ready: true,
      version: pong.version,
      uptime_ms: pong.uptimeMs,
      hostname: pong.hostname,
      rtt_ms: performance.now() - t0,
    };
  });

  const execRequest = (id: string, body: S.ExecBodyT) => {
    if (body.args && body.argv) throw new ForkdError("bad_request", "send the command as `args` (forkd's name) or `argv`, not both");
    const argv = body.args ?? body.argv;
    if ((argv === undefined) === (body.cmd === undefined)) {
      throw new ForkdError("bad_request", "exec takes exactly one of `args` (array of strings, no shell) or `cmd` (a shell command line)");
    }
    if (body.timeout_secs !== undefined && body.timeout_ms !== undefined) {
      throw new ForkdError("bad_request", "send the timeout as `timeout_secs` (forkd's) or `timeout_ms`, not both");
    }
    if (body.tag !== undefined && !body.background)
      throw new ForkdError("bad_request", "`tag` labels a background process: send it with `background: true`");
    noNulBytes({ [body.args ? "args" : "argv"]: argv, cmd: body.cmd, env: body.env, cwd: body.cwd });
    const secs = boundedTimeout(body.timeout_secs, "timeout_secs", "execSecs");
    const timeoutMs = secs !== undefined ? secs * 1000 : boundedTimeout(body.timeout_ms, "timeout_ms", "exec");
    const stdin = body.stdin !== undefined ? Buffer.from(body.stdin, body.stdin_encoding ?? "utf8") : undefined;
    if (stdin) checkGuestPayload("exec stdin", stdin.length, getSandbox(id).memory_mib);
    return {
      ...(argv ? { argv } : { cmd: body.cmd }),
      ...(body.env ? { env: body.env } : {}),
      ...(body.cwd ? { cwd: body.cwd } : {}),
      ...(stdin ? { stdin: stdin.toString("base64") } : {}),
      ...(timeoutMs ? { timeoutMs } : {}),
    };
  };

  r.post(
    "/v1/sandboxes/:id/exec",
    { schema: { params: S.IdParam, body: S.ExecBody, response: { 200: z.union([S.ExecResponse, S.ProcessInfo]), ...err } } },
    async (request) => {
      const exec = execRequest(request.params.id, request.body);
      if (request.body.background) return startBackground(ctx, request.params.id, exec, request.body.tag);
      const agent = await ctx.agents.forSandbox(request.params.id);
      const stdout: Buffer[] = [];
      const stderr: Buffer[] = [];
      const t0 = performance.now();
      // Buffered output is capped (FORKD_MAX_OUTPUT_BYTES, 16 MiB by default); a command
      // that passes the cap is killed, since nobody could see the rest of what it writes.
      const res = await agent.exec(exec, {
        onStdout: (d) => stdout.push(d),
        onStderr: (d) => stderr.push(d),
        cancelOnOutputLimit: true,
      });
      ctx.metrics.callSeconds.labels("exec").observe((performance.now() - t0) / 1000);
      return {
        exit_code: res.exitCode,
        signal: res.signal,
        timed_out: res.timedOut,
        stdout: Buffer.concat(stdout).toString("utf8"),
        stderr: Buffer.concat(stderr).toString("utf8"),
        duration_ms: res.durationMs,
        truncated: res.truncated,
      };
    },
  );

  // Streaming exec: newline-delimited JSON, one object per output chunk, then the exit.
  r.post("/v1/sandboxes/:id/exec/stream", { schema: { params: S.IdParam, body: S.ExecBody } }, async (request, reply) => {
    if (request.body.background) {
      throw new ForkdError("bad_request", "a background process is started with POST /exec; follow it with GET /processes/PID/output");
    }
    const exec = execRequest(request.params.id, request.body);
    const agent = await ctx.agents.forSandbox(request.params.id);
    // A client that goes away before the exit line cancels the command in the guest.
    const stream = openOutputStream(reply);
    const t0 = performance.now();
    stream.finish(
      agent
        .exec(exec, {
          signal: stream.signal,
          // The stream's own bound is STREAM_BUFFER_BYTES; a fast reader may take any amount.
          maxOutputBytes: Number.POSITIVE_INFINITY,
          onStdout: stream.onStdout,
          onStderr: stream.onStderr,
        })
        .then((res) => {
          ctx.metrics.callSeconds.labels("exec").observe((performance.now() - t0) / 1000);
          return {
            exit_code: res.exitCode,
            signal: res.signal,
            timed_out: res.timedOut,
            duration_ms: res.durationMs,
            truncated: stream.truncated(),
          };
        }),
    );
    return reply;
  });

  r.post(
    "/v1/sandboxes/:id/eval",
    { schema: { params: S.IdParam, body: S.EvalBody, response: { 200: S.EvalResponse, ...err } } },
    async (request) => {
      const evalTimeoutMs = boundedTimeout(request.body.timeout_ms, "timeout_ms", "eval");
      const agent = await ctx.agents.forSandbox(request.params.id);
      const language = request.body.language ?? (await mainLanguage(request.params.id));
      const t0 = performance.now();
      try {
        const res = await agent.eval(request.body.code, {
          ...(evalTimeoutMs !== undefined ? { evalTimeoutMs } : {}),
          language,
          // The agent enforces the eval's own timeout; the call may take a little longer.
          timeoutMs: (evalTimeoutMs ?? 30_000) + 10_000,
        });
        ctx.metrics.callSeconds.labels("eval").observe((performance.now() - t0) / 1000);
        return {
          result: res.text ?? (typeof res.value === "string" ? res.value : (JSON.stringify(res.value) ?? String(res.value))),
          error: null,
          exit_code: 0,
          value: res.value,
          type: res.type,
          language,
          duration_ms: res.durationMs,
          ...(res.stdout ? { stdout: res.stdout } : {}),
        };
      } catch (e) {
        // As forkd: the code's own exception is an answer (exit_code 1), not a failed call.
        // So is running past its own timeout (as exec's timed_out): the caller set the deadline.
        if (!(e instanceof AgentCallError) || (e.agentCode !== "eval_error" && e.agentCode !== "timeout")) throw e;
        return {
          result: null,
          error: e.message,
          exit_code: 1,
          language,
          duration_ms: performance.now() - t0,
          ...(e.agentCode === "timeout" ? { timed_out: true } : {}),
        };
      }
    },
  );

  r.post(
    "/v1/sandboxes/:id/files",
    { schema: { params: S.IdParam, body: S.FilesBody, response: { 200: z.record(z.string(), z.unknown()), ...err } } },
    async (request) => {
      const body = request.body;
      if (body.action === "write") {
        const bytes = Buffer.from(body.data, body.encoding ?? "utf8");
        checkGuestPayload("the file's content", bytes.length, getSandbox(request.params.id).memory_mib);
        const agent = await ctx.agents.forSandbox(request.params.id);
        const data = bytes.toString("base64");
        return agent.files<Record<string, unknown>>({
          action: "write",
          path: body.path,
          data,
          ...(body.mode !== undefined ? { mode: body.mode } : {}),
        });
      }
      const agent = await ctx.agents.forSandbox(request.params.id);
      const res = await agent.files<Record<string, unknown>>(body);
      return body.action === "read" ? { ...res, encoding: "base64" } : res;
    },
  );
}
