// Background processes of a sandbox (E2B's commands.run with background, list, kill,
// connect, sendStdin). They live in the guest agent's registry: they outlive the
// request and the HTTP connection that started them, and a BRANCH carries them (and
// the output they have kept) into every child.
import type { ProcExit, ProcInfo } from "@forkd/agent/protocol";
import { checkGuestPayload, ForkdError, getSandbox } from "@forkd/core";
import { z } from "zod";
import * as S from "../schemas.js";
import type { RouteDeps, ServerContext } from "./context.js";
import { openOutputStream } from "./output-stream.js";

/** The agent's view of a process in the API's (E2B's) shape. */
function apiProcessView(p: ProcInfo): S.ProcessInfoT {
  const [cmd, ...args] = p.argv ?? ["/bin/sh", "-c", p.cmd ?? ""];
  return {
    pid: p.pid,
    tag: p.tag ?? null,
    cmd: cmd!,
    args,
    envs: p.env,
    cwd: p.cwd,
    running: p.running,
    exit_code: p.exitCode,
    signal: p.signal,
    timed_out: p.timedOut,
    started_at: new Date(p.startedAtMs).toISOString(),
    ended_at: p.endedAtMs === null ? null : new Date(p.endedAtMs).toISOString(),
    stdout_bytes: p.stdoutBytes,
    stderr_bytes: p.stderrBytes,
    stdin_open: p.stdinOpen,
  };
}

/** exec with background: true. `exec` is the exec body already checked and translated for the agent. */
export async function startBackground(
  ctx: ServerContext,
  id: string,
  exec: { argv?: string[]; cmd?: string; env?: Record<string, string>; cwd?: string; stdin?: string; timeoutMs?: number },
  tag: string | undefined,
): Promise<S.ProcessInfoT> {
  const agent = await ctx.agents.forSandbox(id);
  const info = await agent.procStart({ ...exec, ...(tag !== undefined ? { tag } : {}) });
  return apiProcessView(info);
}

function pidOf(params: { pid: string }): number {
  return Number(params.pid);
}

export function registerProcessRoutes({ r, ctx, err }: RouteDeps): void {
  r.get("/v1/sandboxes/:id/processes", { schema: { params: S.IdParam, response: { 200: S.ProcessList, ...err } } }, async (request) => {
    const agent = await ctx.agents.forSandbox(request.params.id);
    return (await agent.procList()).map(apiProcessView);
  });

  r.get(
    "/v1/sandboxes/:id/processes/:pid",
    { schema: { params: S.ProcessParam, response: { 200: S.ProcessInfo, ...err } } },
    async (request) => {
      const agent = await ctx.agents.forSandbox(request.params.id);
      const pid = pidOf(request.params);
      const found = (await agent.procList()).find((p) => p.pid === pid);
      if (!found) throw new ForkdError("not_found", `no background process ${pid} in sandbox ${request.params.id}`);
      return apiProcessView(found);
    },
  );

  // The whole process group is signalled (SIGKILL unless ?signal= says otherwise).
  r.delete(
    "/v1/sandboxes/:id/processes/:pid",
    { schema: { params: S.ProcessParam, querystring: S.KillProcessQuery, response: { 204: z.null(), ...err } } },
    async (request, reply) => {
      const agent = await ctx.agents.forSandbox(request.params.id);
      await agent.procKill(pidOf(request.params), request.query.signal);
      return reply.code(204).send(null);
    },
  );

  r.post(
    "/v1/sandboxes/:id/processes/:pid/stdin",
    { schema: { params: S.ProcessParam, body: S.ProcessStdinBody, response: { 200: S.ProcessStdinResponse, ...err } } },
    async (request) => {
      const body = request.body;
      if (body.data === undefined && !body.eof) throw new ForkdError("bad_request", "send `data`, `eof: true`, or both");
      if (body.encoding === "base64" && body.data !== undefined && !/^[A-Za-z0-9+/]*={0,2}$/.test(body.data)) {
        throw new ForkdError("bad_request", "`data` is not base64");
      }
      const data = Buffer.from(body.data ?? "", body.encoding ?? "utf8");
      checkGuestPayload("stdin", data.length, getSandbox(request.params.id).memory_mib);
      const agent = await ctx.agents.forSandbox(request.params.id);
      const res = await agent.procStdin(pidOf(request.params), data, body.eof === true);
      return { pid: res.pid, bytes: res.bytes, stdin_open: res.stdinOpen };
    },
  );

  // Reattach: NDJSON, the output the process has kept first, then live output, then an
  // exit line. A client that leaves detaches; the process runs on.
  r.get("/v1/sandboxes/:id/processes/:pid/output", { schema: { params: S.ProcessParam } }, async (request, reply) => {
    const pid = pidOf(request.params);
    const agent = await ctx.agents.forSandbox(request.params.id);
    // Unknown pids are a 404 here, before the 200 of a stream is committed.
    if (!(await agent.procList()).some((p) => p.pid === pid)) {
      throw new ForkdError("not_found", `no background process ${pid} in sandbox ${request.params.id}`);
    }
    // As exec/stream, but a client that leaves only detaches: the process runs on.
    const stream = openOutputStream(reply);
    stream.finish(
      agent.procAttach(pid, { signal: stream.signal, onStdout: stream.onStdout, onStderr: stream.onStderr }).then((exit: ProcExit) => {
        // Output the guest's ring had already let go of before it could be sent counts as truncated too.
        if (exit.droppedBytes > 0) stream.line({ type: "truncated", dropped_bytes: exit.droppedBytes, evicted: true });
        return {
          pid,
          exit_code: exit.exitCode,
          signal: exit.signal,
          timed_out: exit.timedOut,
          duration_ms: exit.durationMs,
          truncated: stream.truncated() || exit.droppedBytes > 0,
        };
      }),
    );
    return reply;
  });
}
