// The host's background-process calls over a real unix socket, no VM: against the
// real agent (answers pass validation, end to end), and against a scripted hostile
// guest whose made-up answers close the channel as violations, never reach a caller.
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { encodeFrame, FrameDecoder } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { AgentClient } from "@forkd/core";
import { afterAll, afterEach, describe, expect, it } from "vitest";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-proc-client-"));
let counter = 0;
const cleanup: (() => void)[] = [];

afterEach(() => {
  for (const c of cleanup.splice(0)) c();
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A unix socket whose peer is a real AgentServer on this host. */
async function realAgent(): Promise<AgentClient> {
  const socketPath = path.join(dir, `real-${counter++}.sock`);
  const server = net.createServer((socket) => {
    const decoder = new FrameDecoder();
    const agent = new AgentServer((frame) => socket.write(encodeFrame(frame)));
    socket.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) if (f.ok) agent.handle(f.message);
    });
    socket.on("error", () => {});
    socket.on("close", () => agent.abortAll());
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  const client = await AgentClient.connect(socketPath);
  cleanup.push(() => {
    client.close();
    server.close();
  });
  return client;
}

/** A guest that answers every request with `answer(request)`. */
async function scriptedGuest(answer: (request: Record<string, unknown>) => unknown) {
  const socketPath = path.join(dir, `fake-${counter++}.sock`);
  const server = net.createServer((socket) => {
    const decoder = new FrameDecoder();
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) {
        if (!f.ok) continue;
        const request = f.message as Record<string, unknown>;
        if (request.op === "cancel") continue;
        socket.write(encodeFrame({ id: request.id, ...(answer(request) as object) }));
      }
    });
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  const violations: string[] = [];
  const client = await AgentClient.connect(socketPath, { onViolation: (reason) => violations.push(reason) });
  cleanup.push(() => {
    client.close();
    server.close();
  });
  return { client, violations };
}

const goodInfo = {
  pid: 42,
  cmd: "sleep 1",
  cwd: "/root",
  env: {},
  startedAtMs: 1,
  running: true,
  exitCode: null,
  signal: null,
  timedOut: false,
  endedAtMs: null,
  stdoutBytes: 0,
  stderrBytes: 0,
  stdinOpen: true,
};

describe("background-process calls", () => {
  it("run end to end against the real agent: start, list, stdin, attach, kill", async () => {
    const agent = await realAgent();
    const info = await agent.procStart({ argv: ["cat"] });
    const out: string[] = [];
    const attached = agent.procAttach(info.pid, { onStdout: (d) => out.push(d.toString()) });
    expect(await agent.procStdin(info.pid, Buffer.from("ping\n"), false)).toEqual({ pid: info.pid, bytes: 5, stdinOpen: true });
    expect((await agent.procList()).map((p) => p.pid)).toContain(info.pid);
    const deadline = Date.now() + 5000;
    while (out.join("") !== "ping\n" && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(await agent.procKill(info.pid, "SIGTERM")).toEqual({ pid: info.pid, signal: "SIGTERM", signalled: true });
    expect(await attached).toMatchObject({ pid: info.pid, exitCode: null, signal: "SIGTERM", droppedBytes: 0, truncated: false });
    expect(out.join("")).toBe("ping\n");
    await expect(agent.procKill(info.pid, undefined)).rejects.toMatchObject({ code: "invalid_state", agentCode: "not_running" });
    await expect(agent.procAttach(999_999)).rejects.toMatchObject({ code: "not_found" });
  });

  it("a detach (abort) ends the attach and leaves the process running", async () => {
    const agent = await realAgent();
    const info = await agent.procStart({ cmd: "while :; do echo x; sleep 0.05; done" });
    const detach = new AbortController();
    const attached = agent.procAttach(info.pid, { signal: detach.signal });
    await new Promise((r) => setTimeout(r, 200));
    detach.abort();
    await expect(attached).rejects.toMatchObject({ code: "agent_error" });
    expect((await agent.procList()).find((p) => p.pid === info.pid)).toMatchObject({ running: true });
    await agent.procKill(info.pid, undefined);
  });

  const hostile: [string, string, (request: Record<string, unknown>) => unknown, (c: AgentClient) => Promise<unknown>][] = [
    ["a pid of 0", "pid", () => ({ kind: "result", value: { ...goodInfo, pid: 0 } }), (c) => c.procStart({ cmd: "x" })],
    ["a pid past pid_max", "pid", () => ({ kind: "result", value: { ...goodInfo, pid: 2 ** 40 } }), (c) => c.procStart({ cmd: "x" })],
    ["both argv and cmd", "exactly one", () => ({ kind: "result", value: { ...goodInfo, argv: ["a"] } }), (c) => c.procStart({ cmd: "x" })],
    ["an env of numbers", "env", () => ({ kind: "result", value: { ...goodInfo, env: { A: 1 } } }), (c) => c.procStart({ cmd: "x" })],
    [
      "a running process with an exit code",
      "running with an exit",
      () => ({ kind: "result", value: { ...goodInfo, exitCode: 3 } }),
      (c) => c.procStart({ cmd: "x" }),
    ],
    [
      "a signal that is not a name",
      "signal",
      () => ({ kind: "result", value: { ...goodInfo, running: false, signal: "rm -rf", endedAtMs: 2 } }),
      (c) => c.procStart({ cmd: "x" }),
    ],
    ["a list that is not an array", "processes", () => ({ kind: "result", value: { processes: {} } }), (c) => c.procList()],
    [
      "a list longer than the agent keeps",
      "more than the agent keeps",
      () => ({ kind: "result", value: { processes: Array.from({ length: 200 }, (_, i) => ({ ...goodInfo, pid: i + 1 })) } }),
      (c) => c.procList(),
    ],
    ["a list naming a pid twice", "twice", () => ({ kind: "result", value: { processes: [goodInfo, goodInfo] } }), (c) => c.procList()],
    [
      "a kill answer for another pid",
      "pid: 7",
      () => ({ kind: "result", value: { pid: 8, signal: "SIGKILL", signalled: true } }),
      (c) => c.procKill(7, undefined),
    ],
    [
      "a stdin answer with another byte count",
      "bytes: 3",
      () => ({ kind: "result", value: { pid: 7, bytes: 300, stdinOpen: true } }),
      (c) => c.procStdin(7, Buffer.from("abc"), false),
    ],
    [
      "an exit of another process",
      "exit of process 7",
      () => ({ kind: "result", value: { pid: 9, exitCode: 0, signal: null, timedOut: false, durationMs: 1, droppedBytes: 0 } }),
      (c) => c.procAttach(7),
    ],
    [
      "an exit with a negative dropped count",
      "droppedBytes",
      () => ({ kind: "result", value: { pid: 7, exitCode: 0, signal: null, timedOut: false, durationMs: 1, droppedBytes: -1 } }),
      (c) => c.procAttach(7),
    ],
  ];

  for (const [what, reason, answer, call] of hostile) {
    it(`closes the channel on ${what}`, async () => {
      const { client, violations } = await scriptedGuest(answer);
      await expect(call(client)).rejects.toMatchObject({ code: "agent_error" });
      expect(violations).toHaveLength(1);
      expect(violations[0]).toContain(reason);
      expect(client.isClosed).toBe(true);
    });
  }

  it("accepts a well-formed answer from the same script", async () => {
    const { client, violations } = await scriptedGuest(() => ({ kind: "result", value: goodInfo }));
    expect(await client.procStart({ cmd: "x" })).toEqual(goodInfo);
    expect(violations).toEqual([]);
  });
});
