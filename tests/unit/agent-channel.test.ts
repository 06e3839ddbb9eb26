// The host side of the agent channel against a scripted guest over a real unix
// socket (no VM): every frame is checked, violations close the channel once and are
// reported, nothing throws out of a listener, and reassembly is linear.
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { encodeFrame, FrameDecoder, MAX_FRAME_BYTES, parseResponseFrame, type ResponseFrame } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { AgentClient, isForkdError } from "@forkd/core";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

function header(length: number): Buffer {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(length);
  return h;
}

function rawFrame(body: string): Buffer {
  const bytes = Buffer.from(body, "utf8");
  return Buffer.concat([header(bytes.length), bytes]);
}

/** The process's CPU time since `start`: a bound on the algorithm's cost that a busy host (wall clock) does not break. */
function cpuMsSince(start: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(start);
  return (used.user + used.system) / 1000;
}

describe("frame reassembly", () => {
  it("costs time linear in the bytes: a 16 MiB frame in 4 KiB reads, and a 64 KiB frame byte by byte", () => {
    const body = Buffer.alloc(MAX_FRAME_BYTES - 64, 0x61);
    const frame = Buffer.concat([header(body.length + 2), Buffer.from('"'), body, Buffer.from('"')]);
    const decoder = new FrameDecoder();
    const started = process.cpuUsage();
    let frames: ReturnType<FrameDecoder["push"]> = [];
    for (let offset = 0; offset < frame.length; offset += 4096) {
      frames = frames.concat(decoder.push(frame.subarray(offset, offset + 4096)));
      if (offset === 1 << 20) expect(decoder.pendingBytes).toBe((1 << 20) + 4096);
    }
    // Re-joining the partial buffer on every read copies ~32 GB here (minutes); one copy is milliseconds.
    expect(cpuMsSince(started)).toBeLessThan(2000);
    expect(frames).toHaveLength(1);
    expect(frames[0]?.ok && (frames[0].message as string).length).toBe(body.length);
    expect(decoder.pendingBytes).toBe(0);

    const small = encodeFrame({ id: 1, kind: "result", value: "x".repeat(65_536) });
    const trickled = new FrameDecoder();
    const t0 = process.cpuUsage();
    const out = [];
    for (let i = 0; i < small.length; i++) out.push(...trickled.push(small.subarray(i, i + 1)));
    expect(cpuMsSince(t0)).toBeLessThan(2000);
    expect(out).toHaveLength(1);
  });

  it("refuses a length prefix over the limit from the header alone, before buffering any body", () => {
    const decoder = new FrameDecoder();
    const frames = decoder.push(header(2 ** 31));
    expect(frames).toHaveLength(1);
    expect(frames[0]).toMatchObject({ ok: false, error: expect.stringMatching(/exceeds/) });
    expect(decoder.pendingBytes).toBe(0);
    expect(decoder.push(Buffer.alloc(1 << 20))).toEqual([]);
    expect(decoder.pendingBytes).toBe(0);
  });

  it("decodes a header split across reads and several frames in one read", () => {
    const a = encodeFrame({ id: 1 });
    const b = encodeFrame({ id: 2 });
    const decoder = new FrameDecoder();
    expect(decoder.push(a.subarray(0, 1))).toEqual([]);
    expect(decoder.push(a.subarray(1, 3))).toEqual([]);
    expect(decoder.pendingBytes).toBe(3);
    expect(decoder.push(Buffer.concat([a.subarray(3), b, b.subarray(0, 2)]))).toEqual([
      { ok: true, message: { id: 1 } },
      { ok: true, message: { id: 2 } },
    ]);
    expect(decoder.push(b.subarray(2))).toEqual([{ ok: true, message: { id: 2 } }]);
  });

  it("does not echo the peer's bytes in a JSON error", () => {
    const [frame] = new FrameDecoder().push(rawFrame("\u001b[31mnot json"));
    expect(frame).toEqual({ ok: false, error: "a frame of 13 bytes is not valid JSON" });
  });
});

describe("response frame validation", () => {
  const bad: [string, unknown][] = [
    ["null", null],
    ["a number", 42],
    ["a string", "x"],
    ["an array", [{ id: 1, kind: "result", value: 1 }]],
    ["a boolean", true],
    ["id as a string", { id: "1", kind: "result", value: 1 }],
    ["a negative id", { id: -1, kind: "result", value: 1 }],
    ["a fractional id", { id: 1.5, kind: "result", value: 1 }],
    ["an unsafe id", { id: 2 ** 60, kind: "result", value: 1 }],
    ["no id", { kind: "result", value: 1 }],
    ["an unknown kind", { id: 1, kind: "surprise" }],
    ["no kind", { id: 1, value: 1 }],
    ["a result without value", { id: 1, kind: "result" }],
    ["chunk data not base64", { id: 1, kind: "chunk", stream: "stdout", data: "not base64!" }],
    ["chunk data of a bad length", { id: 1, kind: "chunk", stream: "stdout", data: "abc" }],
    ["chunk data not a string", { id: 1, kind: "chunk", stream: "stdout", data: 5 }],
    ["chunk of an unknown stream", { id: 1, kind: "chunk", stream: "stdin", data: "" }],
    ["an error code that is no code", { id: 1, kind: "error", code: "Not A Code", message: "m" }],
    ["an error without message", { id: 1, kind: "error", code: "io_error" }],
    ["error details that are an array", { id: 1, kind: "error", code: "io_error", message: "m", details: [] }],
  ];
  for (const [name, message] of bad) {
    it(`refuses ${name}`, () => {
      const parsed = parseResponseFrame(message);
      expect(parsed.ok).toBe(false);
    });
  }

  it("accepts well-formed frames and keeps only their known fields", () => {
    expect(parseResponseFrame({ id: 0, kind: "result", value: null, extra: 1 })).toEqual({
      ok: true,
      frame: { id: 0, kind: "result", value: null },
    });
    expect(parseResponseFrame({ id: 3, kind: "chunk", stream: "stderr", data: "aGk=" })).toEqual({
      ok: true,
      frame: { id: 3, kind: "chunk", stream: "stderr", data: "aGk=" },
    });
    const long = parseResponseFrame({ id: 4, kind: "error", code: "io_error", message: "m".repeat(100_000) });
    expect(long.ok && long.frame.kind === "error" && long.frame.message.length).toBeLessThan(8200);
  });
});

/** A scripted guest: the test reads the host's requests and writes whatever bytes it likes. */
class FakeGuest {
  readonly requests: Record<string, unknown>[] = [];
  private socket: net.Socket | undefined;
  private readonly decoder = new FrameDecoder();
  private waiters: (() => void)[] = [];

  constructor(readonly server: net.Server) {
    server.on("connection", (s) => {
      this.socket = s;
      s.on("error", () => {});
      s.on("data", (chunk: Buffer) => {
        for (const f of this.decoder.push(chunk)) if (f.ok) this.requests.push(f.message as Record<string, unknown>);
        for (const w of this.waiters.splice(0)) w();
      });
    });
  }

  async request(predicate: (r: Record<string, unknown>) => boolean = () => true): Promise<Record<string, unknown>> {
    for (;;) {
      const found = this.requests.find(predicate);
      if (found) return found;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  write(bytes: Buffer): void {
    this.socket?.write(bytes);
  }

  send(frame: unknown): void {
    this.write(encodeFrame(frame));
  }
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-channel-"));
let counter = 0;
const open: { server: net.Server; agent: AgentClient }[] = [];

async function pair(): Promise<{ guest: FakeGuest; agent: AgentClient; violations: string[] }> {
  const socketPath = path.join(dir, `agent-${counter++}.sock`);
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(socketPath, r));
  const guest = new FakeGuest(server);
  const violations: string[] = [];
  const agent = await AgentClient.connect(socketPath, { onViolation: (reason) => violations.push(reason) });
  open.push({ server, agent });
  return { guest, agent, violations };
}

async function until(predicate: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 5));
  }
}

let uncaught: unknown[] = [];
const onUncaught = (err: unknown) => uncaught.push(err);

describe("agent client against a hostile guest", () => {
  beforeAll(() => {
    process.on("uncaughtException", onUncaught);
  });
  afterEach(() => {
    for (const { server, agent } of open.splice(0)) {
      agent.close();
      server.close();
    }
    expect(uncaught).toEqual([]);
    uncaught = [];
  });
  afterAll(() => {
    process.off("uncaughtException", onUncaught);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const bodies = ["null", "42", '"x"', "[1,2]", '{"id":"1","kind":"result","value":1}', '{"id":1,"kind":"nope"}'];
  for (const body of bodies) {
    it(`closes the channel on the body ${body}, fails the call in flight and reports it once`, async () => {
      const { guest, agent, violations } = await pair();
      const ping = agent.ping();
      await guest.request();
      guest.write(rawFrame(body));
      guest.write(rawFrame(body));
      const err = await ping.catch((e: unknown) => e);
      expect(isForkdError(err, "agent_error")).toBe(true);
      expect((err as Error).message).toMatch(/broke the protocol/);
      expect(violations).toHaveLength(1);
      expect(agent.isClosed).toBe(true);
      await expect(agent.ping()).rejects.toThrow(/broke the protocol/);
    });
  }

  it("closes on chunk data that is not base64, even for a call in flight", async () => {
    const { guest, agent, violations } = await pair();
    const exec = agent.exec({ argv: ["true"] });
    const req = await guest.request();
    guest.send({ id: req.id, kind: "chunk", stream: "stdout", data: "%%%%" });
    await expect(exec).rejects.toThrow(/base64/);
    expect(violations[0]).toMatch(/base64/);
  });

  it("closes on a length prefix of 2^31 without waiting for its body", async () => {
    const { guest, violations } = await pair();
    guest.write(header(2 ** 31));
    await until(() => violations.length === 1);
    expect(violations[0]).toMatch(/exceeds/);
  });

  it("drops a few frames for ids it never used, and closes on a flood of them", async () => {
    const { guest, agent, violations } = await pair();
    for (let i = 0; i < 10; i++) guest.send({ id: 2 ** 40 + 7, kind: "chunk", stream: "stdout", data: "aGk=" });
    const ping = agent.ping();
    const req = await guest.request();
    guest.send({ id: req.id, kind: "result", value: { version: "0.1.0", uptimeMs: 1, hostname: "h", runtimes: [] } });
    expect((await ping).version).toBe("0.1.0");
    expect(violations).toEqual([]);
    for (let i = 0; i < 2000; i++) guest.send({ id: 2 ** 40 + 7, kind: "chunk", stream: "stdout", data: "aGk=" });
    await until(() => violations.length === 1);
    expect(violations[0]).toMatch(/never used/);
  });

  it("closes on a second answer for a call that has finished, and on a chunk for a ping", async () => {
    const first = await pair();
    const ping = first.agent.ping();
    const req = await first.guest.request();
    const answer = { id: req.id, kind: "result", value: { version: "v", uptimeMs: 1, hostname: "h" } };
    first.guest.send(answer);
    await ping;
    first.guest.send(answer);
    await until(() => first.violations.length === 1);
    expect(first.violations[0]).toMatch(/already finished/);

    const second = await pair();
    const p2 = second.agent.ping();
    const r2 = await second.guest.request();
    second.guest.send({ id: r2.id, kind: "chunk", stream: "stdout", data: "" });
    await expect(p2).rejects.toThrow(/broke the protocol/);
    expect(second.violations[0]).toMatch(/no output/);
  });

  it("closes on an answer of the wrong shape for its op", async () => {
    const { guest, agent, violations } = await pair();
    const exec = agent.exec({ argv: ["true"] });
    const req = await guest.request();
    guest.send({ id: req.id, kind: "result", value: { exitCode: "zero" } });
    await expect(exec).rejects.toThrow(/exitCode/);
    expect(violations[0]).toMatch(/exitCode/);
  });

  it("times a call out at its deadline, cancels it in the guest, and tolerates its late answer", async () => {
    const { guest, agent, violations } = await pair();
    const started = performance.now();
    await expect(agent.ping({ timeoutMs: 200 })).rejects.toMatchObject({ code: "vm_timeout" });
    expect(performance.now() - started).toBeLessThan(1000);
    const req = await guest.request((r) => r.op === "ping");
    const cancel = await guest.request((r) => r.op === "cancel");
    expect(cancel.target).toBe(req.id);
    guest.send({ id: req.id, kind: "result", value: { version: "v", uptimeMs: 1, hostname: "h" } });
    guest.send({ id: cancel.id, kind: "result", value: { cancelled: false } });
    const next = agent.ping();
    const r2 = await guest.request((r) => r.op === "ping" && r.id !== req.id);
    guest.send({ id: r2.id, kind: "result", value: { version: "v", uptimeMs: 1, hostname: "h" } });
    await next;
    expect(violations).toEqual([]);
  });

  it("closes on an agent that goes silent with a cancel outstanding", async () => {
    process.env.FORKD_AGENT_GRACE_MS = "300";
    try {
      const { guest, agent, violations } = await pair();
      const ping = agent.ping();
      const req = await guest.request();
      guest.send({ id: req.id, kind: "result", value: { version: "v", uptimeMs: 1, hostname: "h" } });
      await ping;
      guest.write(header(100));
      await expect(agent.ping({ timeoutMs: 100 })).rejects.toMatchObject({ code: "vm_timeout" });
      await until(() => violations.length === 1);
      expect(violations[0]).toMatch(/stopped answering.*unfinished frame/);
    } finally {
      delete process.env.FORKD_AGENT_GRACE_MS;
    }
  });

  it("does not take an agent busy in a JavaScript eval for a silent one", async () => {
    process.env.FORKD_AGENT_GRACE_MS = "300";
    try {
      const { guest, agent, violations } = await pair();
      const ping = agent.ping();
      const first = await guest.request();
      guest.send({ id: first.id, kind: "result", value: { version: "v", uptimeMs: 1, hostname: "h" } });
      await ping;
      const evaluation = agent.eval("for (;;) {}", { evalTimeoutMs: 60_000 });
      const evalRequest = await guest.request((r) => r.op === "eval");
      await expect(agent.ping({ timeoutMs: 100 })).rejects.toMatchObject({ code: "vm_timeout" });
      await new Promise((r) => setTimeout(r, 900));
      expect(violations).toEqual([]);
      guest.send({ id: evalRequest.id, kind: "error", code: "timeout", message: "eval ran longer than 60000 ms" });
      await expect(evaluation).rejects.toMatchObject({ code: "vm_timeout" });
      const cancel = await guest.request((r) => r.op === "cancel");
      guest.send({ id: cancel.id, kind: "result", value: { cancelled: false } });
      await new Promise((r) => setTimeout(r, 500));
      expect(violations).toEqual([]);
    } finally {
      delete process.env.FORKD_AGENT_GRACE_MS;
    }
  });

  it("caps one exec's output: what fits is delivered, the command is cancelled, the reply says truncated", async () => {
    const { guest, agent, violations } = await pair();
    let received = 0;
    const exec = agent.exec(
      { argv: ["yes"] },
      { onStdout: (d) => (received += d.length), maxOutputBytes: 10_000, cancelOnOutputLimit: true },
    );
    const req = await guest.request();
    const chunk = Buffer.alloc(3000, 0x79).toString("base64");
    for (let i = 0; i < 10; i++) guest.send({ id: req.id, kind: "chunk", stream: "stdout", data: chunk });
    const cancel = await guest.request((r) => r.op === "cancel");
    expect(cancel.target).toBe(req.id);
    guest.send({ id: req.id, kind: "error", code: "cancelled", message: "exec was cancelled by the host" });
    guest.send({ id: cancel.id, kind: "result", value: { cancelled: true } });
    const res = await exec;
    expect(received).toBe(10_000);
    expect(res).toMatchObject({ truncated: true, exitCode: null, signal: "SIGKILL" });
    expect(violations).toEqual([]);
  });

  it("closes on a guest that ignores the cancel and floods output", async () => {
    const { guest, agent, violations } = await pair();
    const exec = agent.exec({ argv: ["yes"] }, { maxOutputBytes: 1000, cancelOnOutputLimit: true });
    const req = await guest.request();
    const chunk = Buffer.alloc(48 * 1024, 0x79).toString("base64");
    for (let i = 0; i < 400 && violations.length === 0; i++) {
      guest.send({ id: req.id, kind: "chunk", stream: "stdout", data: chunk });
      if (i % 50 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    await expect(exec).rejects.toThrow(/after it was cancelled/);
    expect(violations).toHaveLength(1);
  });
});

describe("agent side of a change of host", () => {
  it("drops the answers of calls whose host hung up, and of a parent's calls once a child's host says who it is", async () => {
    const frames: ResponseFrame[] = [];
    const server = new AgentServer((f) => frames.push(f));
    server.handle({ id: 1, op: "exec", cmd: "sleep 0.2; echo late" });
    server.handle({ id: 2, op: "identity", hostname: "child" });
    await until(() => frames.some((f) => f.id === 2));
    server.handle({ id: 3, op: "exec", cmd: "sleep 5" });
    server.abortAll();
    server.handle({ id: 4, op: "exec", cmd: "sleep 0.3; echo mine" });
    await until(() => frames.some((f) => f.id === 4 && f.kind === "result"));
    await until(() => server.inFlight === 0);
    expect(frames.filter((f) => f.id === 1 || f.id === 3)).toEqual([]);
    expect(frames.find((f) => f.id === 2)).toMatchObject({ kind: "error" });
    expect(frames.filter((f) => f.id === 4).map((f) => f.kind)).toEqual(["chunk", "result"]);
  });
});
