import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { ResponseFrame } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { describe, expect, it } from "vitest";

/** Drive the agent's protocol logic on the host, without a VM. */
function harness(opts: ConstructorParameters<typeof AgentServer>[1] = {}) {
  const frames: ResponseFrame[] = [];
  const waiters: (() => void)[] = [];
  const server = new AgentServer((frame) => {
    frames.push(frame);
    for (const w of waiters.splice(0)) w();
  }, opts);
  const result = async (id: number) => {
    for (;;) {
      const done = frames.find((f) => f.id === id && f.kind !== "chunk");
      if (done) return done;
      await new Promise<void>((r) => waiters.push(r));
    }
  };
  const call = async (message: Record<string, unknown>) => {
    server.handle(message);
    return result(message.id as number);
  };
  return { server, frames, call, result };
}

describe("agent server", () => {
  it("answers ping with version and uptime", async () => {
    const { call } = harness();
    const res = await call({ id: 1, op: "ping" });
    expect(res.kind).toBe("result");
    expect((res as { value: { version: string } }).value.version).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it("streams exec output as chunks and returns the exit code", async () => {
    const { call, frames } = harness();
    const res = await call({ id: 2, op: "exec", cmd: "echo out; echo err >&2; exit 7" });
    expect(res).toMatchObject({ kind: "result", value: { exitCode: 7, timedOut: false } });
    const text = (stream: string) =>
      frames
        .filter((f) => f.kind === "chunk" && f.stream === stream)
        .map((f) => Buffer.from((f as { data: string }).data, "base64").toString())
        .join("");
    expect(text("stdout")).toBe("out\n");
    expect(text("stderr")).toBe("err\n");
  });

  it("passes stdin, env and cwd to exec", async () => {
    const { call, frames } = harness();
    const res = await call({
      id: 3,
      op: "exec",
      argv: ["sh", "-c", 'cat; echo "$FOO"; pwd'],
      stdin: Buffer.from("in\n").toString("base64"),
      env: { FOO: "bar" },
      cwd: "/tmp",
    });
    expect(res).toMatchObject({ kind: "result", value: { exitCode: 0 } });
    const out = frames
      .filter((f) => f.kind === "chunk")
      .map((f) => Buffer.from((f as { data: string }).data, "base64").toString())
      .join("");
    expect(out).toBe("in\nbar\n/tmp\n");
  });

  it("answers 127 for a missing program and kills on timeout", async () => {
    const { call } = harness();
    expect(await call({ id: 4, op: "exec", argv: ["/no/such/program"] })).toMatchObject({ value: { exitCode: 127 } });
    const t0 = Date.now();
    const res = await call({ id: 5, op: "exec", argv: ["sleep", "30"], timeoutMs: 200 });
    expect(res).toMatchObject({ value: { timedOut: true, signal: "SIGKILL" } });
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it("keeps eval state between calls and reports exceptions", async () => {
    const { call } = harness();
    await call({ id: 6, op: "eval", code: "var counter = 40" });
    expect(await call({ id: 7, op: "eval", code: "counter += 2; ({ counter })" })).toMatchObject({ value: { value: { counter: 42 } } });
    expect(await call({ id: 8, op: "eval", code: "Promise.resolve(5).then((x) => x * 2)" })).toMatchObject({ value: { value: 10 } });
    expect(await call({ id: 9, op: "eval", code: "throw new TypeError('nope')" })).toMatchObject({ kind: "error", code: "eval_error" });
    expect(await call({ id: 10, op: "eval", code: "while (true) {}", timeoutMs: 100 })).toMatchObject({ kind: "error", code: "timeout" });
    expect(await call({ id: 11, op: "eval", code: "counter" })).toMatchObject({ value: { value: 42 } });
    // eval runs inside the agent: process.exit would end it, so it is an eval error instead.
    for (const code of ["process.exit(3)", "process.abort()"]) {
      expect(await call({ id: 12, op: "eval", code })).toMatchObject({
        kind: "error",
        code: "eval_error",
        message: expect.stringMatching(/not available in eval/),
      });
    }
    expect(
      await call({
        id: 13,
        op: "eval",
        code: '[process.env.PATH, process.cwd(), process.title, process.memoryUsage().rss, process.hrtime.bigint() > 0n, process.on("forkd-x", () => {}) === process, process.uptime()].join()',
      }),
    ).toMatchObject({ kind: "result" });
  });

  it("moves files: write atomically, read, list, stat, mkdir, remove", async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), "forkd-agent-"));
    const { call } = harness();
    const file = path.join(dir, "sub", "a.txt");
    expect(await call({ id: 20, op: "files", action: "mkdir", path: path.join(dir, "sub") })).toMatchObject({ kind: "result" });
    expect(await call({ id: 21, op: "files", action: "write", path: file, data: Buffer.from("hello").toString("base64") })).toMatchObject({
      value: { size: 5 },
    });
    const read = (await call({ id: 22, op: "files", action: "read", path: file })) as { value: { data: string } };
    expect(Buffer.from(read.value.data, "base64").toString()).toBe("hello");
    const listed = (await call({ id: 23, op: "files", action: "list", path: path.join(dir, "sub") })) as {
      value: { entries: { name: string }[] };
    };
    expect(listed.value.entries.map((e) => e.name)).toEqual(["a.txt"]);
    expect(await call({ id: 24, op: "files", action: "read", path: path.join(dir, "missing") })).toMatchObject({ code: "not_found" });
    expect(await call({ id: 25, op: "files", action: "read", path: "relative/path" })).toMatchObject({ code: "bad_request" });
    expect(await call({ id: 26, op: "files", action: "remove", path: path.join(dir, "sub"), recursive: true })).toMatchObject({
      kind: "result",
    });
    expect(await call({ id: 27, op: "files", action: "stat", path: file })).toMatchObject({ code: "not_found" });
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("makes nested directories, and answers at once where the kernel refuses one (Node's recursive mkdir spins on /proc/x)", async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), "forkd-agent-"));
    const { call } = harness();
    expect(await call({ id: 30, op: "files", action: "mkdir", path: path.join(dir, "a", "b", "c") })).toMatchObject({ kind: "result" });
    expect((await fs.stat(path.join(dir, "a", "b", "c"))).isDirectory()).toBe(true);
    expect(await call({ id: 31, op: "files", action: "mkdir", path: path.join(dir, "a", "b") })).toMatchObject({ kind: "result" });
    await fs.writeFile(path.join(dir, "file"), "x");
    expect(await call({ id: 32, op: "files", action: "mkdir", path: path.join(dir, "file", "sub") })).toMatchObject({ kind: "error" });
    const t0 = performance.now();
    expect(await call({ id: 33, op: "files", action: "mkdir", path: "/proc/forkd-x/y" })).toMatchObject({
      kind: "error",
      code: "not_found",
    });
    expect(performance.now() - t0).toBeLessThan(2_000);
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("answers malformed requests with errors and keeps serving", async () => {
    const { server, frames, call } = harness();
    server.handle("not an object");
    server.handle({ op: "ping" });
    server.rejectFrame("frame is not valid JSON");
    expect(frames.filter((f) => f.kind === "error" && f.code === "bad_frame")).toHaveLength(3);
    expect(await call({ id: 30, op: "nope" })).toMatchObject({ code: "unknown_op" });
    expect(await call({ id: 31, op: "exec", argv: [] })).toMatchObject({ code: "bad_request" });
    expect(await call({ id: 32, op: "exec", argv: ["true"], cmd: "true" })).toMatchObject({ code: "bad_request" });
    expect(await call({ id: 33, op: "ping" })).toMatchObject({ kind: "result" });
  });

  it("refuses calls beyond the concurrency limit and cancels on request", async () => {
    const { server, call, result } = harness({ maxConcurrentCalls: 2 });
    server.handle({ id: 40, op: "exec", argv: ["sleep", "30"] });
    server.handle({ id: 41, op: "exec", argv: ["sleep", "30"] });
    expect(await call({ id: 42, op: "ping" })).toMatchObject({ code: "agent_busy" });
    await call({ id: 43, op: "cancel", target: 40 });
    await call({ id: 44, op: "cancel", target: 41 });
    expect(await result(40)).toMatchObject({ code: "cancelled" });
    expect(await result(41)).toMatchObject({ code: "cancelled" });
    expect(server.inFlight).toBe(0);
  });
});
