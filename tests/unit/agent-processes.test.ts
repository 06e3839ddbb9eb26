// The agent's background-process registry on the host, with real processes and no VM:
// start, list, stdin, attach (replay then live), kill, the cap, ring eviction, and
// exec returning while a child it left behind keeps running.
import type { ResponseFrame } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { afterEach, describe, expect, it } from "vitest";

type Opts = ConstructorParameters<typeof AgentServer>[1];

function harness(opts: Opts = {}) {
  const frames: ResponseFrame[] = [];
  const waiters: (() => void)[] = [];
  const server = new AgentServer((frame) => {
    frames.push(frame);
    for (const w of waiters.splice(0)) w();
  }, opts);
  let nextId = 1;
  const result = async (id: number) => {
    for (;;) {
      const done = frames.find((f) => f.id === id && f.kind !== "chunk");
      if (done) return done;
      await new Promise<void>((r) => waiters.push(r));
    }
  };
  const send = (message: Record<string, unknown>) => {
    const id = nextId++;
    server.handle({ ...message, id });
    return id;
  };
  const call = async (message: Record<string, unknown>) => result(send(message));
  const value = async <T = Record<string, unknown>>(message: Record<string, unknown>): Promise<T> => {
    const res = await call(message);
    if (res.kind !== "result") throw new Error(`${message.op}: ${JSON.stringify(res)}`);
    return res.value as T;
  };
  const output = (id: number, stream = "stdout") =>
    frames
      .filter((f) => f.id === id && f.kind === "chunk" && f.stream === stream)
      .map((f) => Buffer.from((f as { data: string }).data, "base64").toString())
      .join("");
  const waitFor = async (what: () => boolean, ms = 10_000) => {
    const deadline = Date.now() + ms;
    while (!what()) {
      if (Date.now() > deadline) throw new Error("timed out waiting");
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  return { server, frames, send, call, value, output, result, waitFor };
}

const started: number[] = [];
afterEach(() => {
  for (const pid of started.splice(0)) {
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // gone
    }
  }
});

type Info = {
  pid: number;
  running: boolean;
  exitCode: number | null;
  signal: string | null;
  stdinOpen: boolean;
  cmd?: string;
  tag?: string;
};

describe("background processes in the agent", () => {
  it("starts, lists, replays then follows output, and reports the kill as the exit", async () => {
    const h = harness();
    const info = await h.value<Info>({
      op: "proc_start",
      cmd: "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done",
      tag: "ticker",
    });
    started.push(info.pid);
    expect(info).toMatchObject({ running: true, cmd: expect.stringContaining("tick"), tag: "ticker", stdinOpen: true });
    const { processes } = await h.value<{ processes: Info[] }>({ op: "proc_list" });
    expect(processes.map((p) => p.pid)).toEqual([info.pid]);
    await new Promise((r) => setTimeout(r, 300));
    const attach = h.send({ op: "proc_attach", pid: info.pid });
    // What it printed before the attach comes first, from tick 0; then it goes on.
    await h.waitFor(() => /tick 0\n[\s\S]*tick 12\n/.test(h.output(attach)));
    expect(h.output(attach).startsWith("tick 0\ntick 1\n")).toBe(true);
    expect(await h.value({ op: "proc_kill", pid: info.pid, signal: "SIGTERM" })).toEqual({
      pid: info.pid,
      signal: "SIGTERM",
      signalled: true,
    });
    const exit = await h.result(attach);
    expect(exit).toMatchObject({ kind: "result", value: { pid: info.pid, exitCode: null, signal: "SIGTERM", droppedBytes: 0 } });
    const after = await h.value<{ processes: Info[] }>({ op: "proc_list" });
    expect(after.processes[0]).toMatchObject({ pid: info.pid, running: false, signal: "SIGTERM", stdinOpen: false });
    // An exited process is kept: a late attach gets its output and its exit at once.
    const late = h.send({ op: "proc_attach", pid: info.pid });
    expect(await h.result(late)).toMatchObject({ kind: "result", value: { signal: "SIGTERM" } });
    expect(h.output(late)).toBe(h.output(attach));
    expect(await h.call({ op: "proc_kill", pid: info.pid })).toMatchObject({ kind: "error", code: "not_running" });
  });

  it("keeps stdin open across calls, closes it on eof, and refuses it once closed", async () => {
    const h = harness();
    const info = await h.value<Info>({ op: "proc_start", argv: ["cat"] });
    started.push(info.pid);
    const attach = h.send({ op: "proc_attach", pid: info.pid });
    await h.value({ op: "proc_stdin", pid: info.pid, data: Buffer.from("hello ").toString("base64") });
    await h.waitFor(() => h.output(attach) === "hello ");
    expect(await h.value({ op: "proc_stdin", pid: info.pid, data: Buffer.from("world\n").toString("base64"), eof: true })).toEqual({
      pid: info.pid,
      bytes: 6,
      stdinOpen: false,
    });
    expect(await h.result(attach)).toMatchObject({ kind: "result", value: { exitCode: 0, signal: null } });
    expect(h.output(attach)).toBe("hello world\n");
    expect(await h.call({ op: "proc_stdin", pid: info.pid, data: "aGk=" })).toMatchObject({ kind: "error", code: "not_running" });
  });

  it("detaching (a cancel) leaves the process running", async () => {
    const h = harness();
    const info = await h.value<Info>({ op: "proc_start", cmd: "while :; do echo x; sleep 0.05; done" });
    started.push(info.pid);
    const attach = h.send({ op: "proc_attach", pid: info.pid });
    await h.waitFor(() => h.output(attach).length > 0);
    await h.value({ op: "cancel", target: attach });
    expect(await h.result(attach)).toMatchObject({ kind: "error", code: "cancelled" });
    // The host leaving altogether does not stop it either.
    h.server.abortAll();
    await new Promise((r) => setTimeout(r, 200));
    const { processes } = await h.value<{ processes: Info[] }>({ op: "proc_list" });
    expect(processes[0]).toMatchObject({ pid: info.pid, running: true });
  });

  it("enforces the cap with a clear error, and an exited process frees its place", async () => {
    const h = harness({ processes: { maxRunning: 2 } });
    const a = await h.value<Info>({ op: "proc_start", argv: ["sleep", "30"] });
    const b = await h.value<Info>({ op: "proc_start", argv: ["sleep", "30"] });
    started.push(a.pid, b.pid);
    const refused = await h.call({ op: "proc_start", argv: ["sleep", "30"] });
    expect(refused).toMatchObject({ kind: "error", code: "agent_busy", details: { limit: 2 } });
    expect((refused as { message: string }).message).toMatch(/2 background processes already run/);
    await h.value({ op: "proc_kill", pid: a.pid });
    const wait = h.send({ op: "proc_attach", pid: a.pid });
    await h.result(wait);
    const c = await h.value<Info>({ op: "proc_start", argv: ["sleep", "30"] });
    started.push(c.pid);
    expect(c.running).toBe(true);
  });

  it("keeps only the most recent output of a stream and counts what an attach missed", async () => {
    const h = harness({ processes: { ringBytes: 64 * 1024 } });
    const info = await h.value<Info>({ op: "proc_start", cmd: "head -c 1000000 /dev/zero | tr '\\0' a; echo; echo end" });
    started.push(info.pid);
    const first = h.send({ op: "proc_attach", pid: info.pid });
    await h.result(first);
    const late = h.send({ op: "proc_attach", pid: info.pid });
    const exit = await h.result(late);
    const out = h.output(late);
    expect(out.endsWith("aaa\nend\n")).toBe(true);
    expect(out.length).toBeLessThanOrEqual(64 * 1024);
    expect(exit).toMatchObject({ kind: "result", value: { exitCode: 0, droppedBytes: 1_000_005 - out.length } });
  });

  it("refuses bad requests: unknown pid, bad signal, bad base64, a missing program", async () => {
    const h = harness();
    expect(await h.call({ op: "proc_kill", pid: 999_999 })).toMatchObject({ kind: "error", code: "not_found" });
    expect(await h.call({ op: "proc_attach", pid: "1" })).toMatchObject({ kind: "error", code: "bad_request" });
    const info = await h.value<Info>({ op: "proc_start", argv: ["sleep", "30"] });
    started.push(info.pid);
    expect(await h.call({ op: "proc_kill", pid: info.pid, signal: "SIGSEGV" })).toMatchObject({ kind: "error", code: "bad_request" });
    expect(await h.call({ op: "proc_stdin", pid: info.pid, data: "***" })).toMatchObject({ kind: "error", code: "bad_request" });
    expect(await h.call({ op: "proc_start", argv: ["/nonexistent/prog"] })).toMatchObject({ kind: "error", code: "not_found" });
    expect(await h.call({ op: "proc_start", argv: ["true"], cwd: "/nonexistent" })).toMatchObject({
      kind: "error",
      code: "not_found",
      message: expect.stringContaining("working directory"),
    });
  });
});

describe("exec and what it leaves behind", () => {
  it("returns when its process exits, though a background child still holds its output, and that child runs on", async () => {
    const h = harness();
    const marker = `/tmp/forkd-unit-linger-${process.pid}`;
    const t0 = performance.now();
    const res = await h.value<{ exitCode: number }>({
      op: "exec",
      cmd: `(trap '' HUP; while :; do echo tick; date +%s%N > ${marker}; sleep 0.05; done) & echo $! > ${marker}.pid; echo started`,
      timeoutMs: 20_000,
    });
    expect(res.exitCode).toBe(0);
    expect(performance.now() - t0).toBeLessThan(5000);
    const fs = await import("node:fs");
    const pid = Number(fs.readFileSync(`${marker}.pid`, "utf8"));
    started.push(pid);
    const before = fs.readFileSync(marker, "utf8");
    await new Promise((r) => setTimeout(r, 300));
    // Still writing (to a pipe nobody answers for any more): not killed by SIGPIPE.
    expect(fs.readFileSync(marker, "utf8")).not.toBe(before);
    process.kill(pid, "SIGKILL");
    fs.rmSync(marker, { force: true });
    fs.rmSync(`${marker}.pid`, { force: true });
  });
});
