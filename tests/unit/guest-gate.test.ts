// The agent's gate (forkd-guestctl gate): compiled from the image's source and
// driven as the agent drives it, with a unix socket standing in for the virtio port.
// Only calls that change nothing on this machine are answered here (ping, park);
// an identity the gate applies would set this host's name and clock, so that path
// is exercised by the fork integration tests, inside guests.
import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { encodeFrame, FrameDecoder } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const SOURCE = fileURLToPath(new URL("../../packages/agent/native/forkd-guestctl.c", import.meta.url));

type GateMessage = { type: string; payload: Buffer };

/** The gate compiled once for the file (a few seconds of gcc on a loaded 2-core host). */
let compiled: string | undefined;
function compileGate(): string {
  if (compiled) return compiled;
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "forkd-gate-bin-")), "forkd-guestctl");
  const cc = spawnSync("cc", ["-O2", "-Wall", "-Wextra", "-Werror", "-o", out, SOURCE], { encoding: "utf8" });
  expect(cc.status, cc.stderr).toBe(0);
  compiled = out;
  return out;
}
const HOOK_TIMEOUT_MS = 60_000;
afterAll(() => {
  if (compiled) fs.rmSync(path.dirname(compiled), { recursive: true, force: true });
});

class Harness {
  private readonly answers: unknown[] = [];
  private readonly messages: GateMessage[] = [];
  private readonly decoder = new FrameDecoder();
  private gateBytes = Buffer.alloc(0);
  private waiters: (() => void)[] = [];

  constructor(
    readonly gate: ChildProcessWithoutNullStreams,
    readonly host: net.Socket,
  ) {
    host.on("data", (chunk: Buffer) => {
      for (const frame of this.decoder.push(chunk)) this.answers.push(frame.ok ? frame.message : frame.error);
      this.wake();
    });
    gate.stdout.on("data", (chunk: Buffer) => {
      this.gateBytes = Buffer.concat([this.gateBytes, chunk]);
      while (this.gateBytes.length >= 5 && this.gateBytes.length >= 5 + this.gateBytes.readUInt32BE(1)) {
        const length = this.gateBytes.readUInt32BE(1);
        this.messages.push({ type: String.fromCharCode(this.gateBytes[0]!), payload: this.gateBytes.subarray(5, 5 + length) });
        this.gateBytes = this.gateBytes.subarray(5 + length);
      }
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private async until<T>(take: () => T | undefined, what: string): Promise<T> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const value = take();
      if (value !== undefined) return value;
      if (Date.now() > deadline) throw new Error(`no ${what} within 10 s`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
  }

  answer(): Promise<Record<string, unknown>> {
    return this.until(() => this.answers.shift() as Record<string, unknown> | undefined, "answer on the port");
  }

  message(): Promise<GateMessage> {
    return this.until(() => this.messages.shift(), "message to the agent");
  }

  park(id: number): void {
    this.gate.stdin.write(`P ${id}\n`);
  }
}

describe("the agent's gate", () => {
  let dir: string;
  let binary: string;
  let server: net.Server;
  let h: Harness;
  const onSigio = () => {};

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-gate-"));
    binary = compileGate();
    // The gate routes the port's SIGIO to its parent (the agent) while it is not parked.
    process.on("SIGIO", onSigio);
    const socketPath = path.join(dir, "port.sock");
    const accepted = new Promise<net.Socket>((resolve) => {
      server = net.createServer(resolve).listen(socketPath);
    });
    await new Promise((r) => server.once("listening", r));
    const guestEnd = net.connect(socketPath);
    await new Promise((r) => guestEnd.once("connect", r));
    // The gate reads this end; we must not.
    guestEnd.pause();
    const gate = spawn(binary, ["gate", "0.1.0", '"javascript"', String(Date.now())], {
      stdio: ["pipe", "pipe", "inherit", guestEnd],
    }) as unknown as ChildProcessWithoutNullStreams;
    h = new Harness(gate, await accepted);
    expect((await h.message()).type).toBe("S");
  }, HOOK_TIMEOUT_MS);

  afterAll(() => {
    h?.gate.kill("SIGKILL");
    h?.host.destroy();
    server?.close();
    process.off("SIGIO", onSigio);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("answers the park itself, then a ping, without the agent", async () => {
    h.park(7);
    expect(await h.answer()).toEqual({ id: 7, kind: "result", value: { parked: true } });
    h.host.write(encodeFrame({ op: "ping", id: 8 }));
    const ping = await h.answer();
    expect(ping).toMatchObject({ id: 8, kind: "result", value: { version: "0.1.0", runtimes: ["javascript"], inFlight: 0 } });
    expect((ping.value as { hostname: string }).hostname).toBe(os.hostname());
  });

  it("reads a frame that arrives in pieces", async () => {
    const frame = encodeFrame({ id: 9, op: "ping" });
    h.host.write(frame.subarray(0, 2));
    await new Promise((r) => setTimeout(r, 50));
    h.host.write(frame.subarray(2, 10));
    await new Promise((r) => setTimeout(r, 50));
    h.host.write(frame.subarray(10));
    expect(await h.answer()).toMatchObject({ id: 9, kind: "result" });
  });

  it("hands the agent every frame it is not sure of, byte for byte, and the port with it", async () => {
    const unsure = [
      encodeFrame({ op: "eval", code: "1", id: 10 }),
      // Requests the agent would refuse or word its own way: it answers them.
      encodeFrame({ op: "exec", argv: [], id: 16 }),
      encodeFrame({ op: "exec", argv: ["true"], cmd: "true", id: 17 }),
      encodeFrame({ op: "exec", argv: ["true"], timeoutMs: 0.5, id: 18 }),
      encodeFrame({ op: "exec", argv: ["true"], env: { "A=B": "c" }, id: 19 }),
      encodeFrame({ op: "exec", argv: ["true"], cwd: "/nonexistent-forkd-dir", id: 21 }),
      encodeFrame({ op: "exec", argv: ["./relative"], id: 22 }),
      encodeFrame({ op: "exec", argv: ["true"], stdin: "not base64!", id: 23 }),
      encodeFrame({ op: "exec", argv: ["true", 1], id: 24 }),
      encodeFrame({ op: "files", action: "list", path: "/", id: 25 }),
      encodeFrame({ op: "files", action: "read", path: "relative", id: 26 }),
      encodeFrame({ op: "files", action: "read", path: "/tmp/", id: 27 }),
      encodeFrame({ op: "files", action: "write", path: "/tmp/forkd-gate-never", data: "AAAA", mode: 99999, id: 28 }),
      encodeFrame({ op: "files", action: "write", path: "/tmp/forkd-gate-never", data: "AAAA", append: 1, id: 29 }),
      encodeFrame({ op: "exec", argv: ["t\u0000rue"], id: 40 }),
      // The host asks for the runtime (FORKD_AGENT_NATIVE_CALLS=off).
      encodeFrame({ op: "exec", argv: ["true"], via: "runtime", id: 42 }),
      // A field the gate does not know (one the protocol may add later) is not ignored: the agent answers.
      encodeFrame({ op: "exec", argv: ["true"], user: "nobody", id: 43 }),
      encodeFrame({ op: "files", action: "read", path: "/etc/hostname", offset: 3, id: 44 }),
      Buffer.concat([Buffer.from([0, 0, 0, 31]), Buffer.from('{"op":"exec","argv":["true"],"id":41}').subarray(0, 31)]),
      // An identity it would have to judge differently from the agent: a bad hostname, lenient base64, a field missing.
      encodeFrame({ op: "identity", hostname: "-bad", entropy: Buffer.alloc(32).toString("base64"), clockMs: 1, id: 11 }),
      encodeFrame({ op: "identity", hostname: "ok", entropy: "AAAA AAAA", clockMs: 1, id: 12 }),
      encodeFrame({ op: "identity", hostname: "ok", id: 13 }),
      encodeFrame({ op: "ping", id: "14" }),
      encodeFrame({ op: "p\\u0069ng", id: 15 }),
      Buffer.concat([Buffer.from([0, 0, 0, 5]), Buffer.from("{op:}")]),
    ];
    // Parked since the first test: each frame goes to the agent, who parks the gate again.
    for (const [i, frame] of unsure.entries()) {
      h.host.write(frame);
      const handed = await h.message();
      expect(handed.type).toBe("F");
      expect(handed.payload.equals(frame)).toBe(true);
      h.park(100 + i);
      expect(await h.answer()).toEqual({ id: 100 + i, kind: "result", value: { parked: true } });
    }
  });

  it("leaves frames sent while it is not parked to the agent until it is parked again", async () => {
    h.host.write(encodeFrame({ op: "eval", code: "1", id: 30 }));
    expect((await h.message()).type).toBe("F");
    // Not parked now: what arrives stays on the port.
    h.host.write(encodeFrame({ op: "ping", id: 31 }));
    await new Promise((r) => setTimeout(r, 200));
    h.park(32);
    expect(await h.answer()).toMatchObject({ id: 32, value: { parked: true } });
    expect(await h.answer()).toMatchObject({ id: 31, kind: "result" });
  });

  it("hands over a large frame after its header, leaving the body on the port for the agent", async () => {
    const big = encodeFrame({ op: "files", action: "write", path: path.join(dir, "big"), data: "A".repeat(300_000), id: 20 });
    h.host.write(big);
    const handed = await h.message();
    expect(handed.payload.equals(big.subarray(0, 4))).toBe(true);
  });

  it("exits when the agent goes away (its stdin closes)", async () => {
    const exited = new Promise((r) => h.gate.once("exit", r));
    h.gate.stdin.end();
    await exited;
  });
});

/**
 * One protocol, one set of semantics: the calls the gate answers itself (exec, files
 * read/write/stat, cancel) get, frame for frame, the answers the Node agent gives
 * (AgentServer, the agent's own code, in this process). Each request runs on both,
 * against the same files; only what differs by nature (durations, mtimes of files
 * each wrote) is set aside.
 */
describe("the gate's native calls answer as the agent does", () => {
  let dir: string;
  let h: Harness;
  let server: net.Server;
  const onSigio = () => {};

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-gate-native-"));
    const binary = compileGate();
    process.on("SIGIO", onSigio);
    const socketPath = path.join(dir, "port.sock");
    const accepted = new Promise<net.Socket>((resolve) => {
      server = net.createServer(resolve).listen(socketPath);
    });
    await new Promise((r) => server.once("listening", r));
    const guestEnd = net.connect(socketPath);
    await new Promise((r) => guestEnd.once("connect", r));
    guestEnd.pause();
    const gate = spawn(binary, ["gate", "0.1.0", '"javascript"', String(Date.now())], {
      stdio: ["pipe", "pipe", "inherit", guestEnd],
    }) as unknown as ChildProcessWithoutNullStreams;
    h = new Harness(gate, await accepted);
    expect((await h.message()).type).toBe("S");
    h.park(1);
    expect(await h.answer()).toMatchObject({ id: 1, value: { parked: true } });
    fs.mkdirSync(path.join(dir, "sub"));
    fs.writeFileSync(path.join(dir, "hello.txt"), "hello\n");
    fs.writeFileSync(path.join(dir, "binary.bin"), Buffer.from([0, 1, 2, 255, 254]));
    fs.symlinkSync("hello.txt", path.join(dir, "link"));
  }, HOOK_TIMEOUT_MS);

  afterAll(() => {
    h?.gate.kill("SIGKILL");
    h?.host.destroy();
    server?.close();
    process.off("SIGIO", onSigio);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  let nextId = 1000;
  /** Every frame of one call from the gate, until its result or error. */
  async function viaGate(request: Record<string, unknown>): Promise<Record<string, unknown>[]> {
    const id = nextId++;
    h.host.write(encodeFrame({ ...request, id }));
    const frames: Record<string, unknown>[] = [];
    for (;;) {
      const frame = await h.answer();
      frames.push(frame);
      if (frame.id === id && frame.kind !== "chunk") return frames.map((f) => ({ ...f, id: 0 }));
    }
  }

  async function viaAgent(request: Record<string, unknown>): Promise<Record<string, unknown>[]> {
    const frames: Record<string, unknown>[] = [];
    return new Promise((resolve) => {
      const agent = new AgentServer((frame) => {
        frames.push({ ...frame, id: 0 } as Record<string, unknown>);
        if (frame.kind !== "chunk") resolve(frames);
      });
      agent.handle({ ...request, id: 7 });
    });
  }

  /** Output chunks joined per stream (how a read splits them is the kernel's), durations and mtimes set aside. */
  function comparable(frames: Record<string, unknown>[]): unknown {
    const out: Record<string, string> = { stdout: "", stderr: "" };
    let last: Record<string, unknown> = {};
    for (const f of frames) {
      if (f.kind === "chunk") out[f.stream as string] += Buffer.from(f.data as string, "base64").toString("latin1");
      else last = f;
    }
    const value = last.value as Record<string, unknown> | undefined;
    if (value && typeof value === "object") {
      if ("durationMs" in value) value.durationMs = typeof value.durationMs === "number" ? "number" : value.durationMs;
    }
    return { ...out, last };
  }

  const execCases: [string, Record<string, unknown>][] = [
    ["true", { op: "exec", argv: ["true"] }],
    ["false", { op: "exec", argv: ["false"] }],
    ["output on both streams and an exit status", { op: "exec", cmd: "echo out; echo err >&2; exit 3" }],
    ["stdin", { op: "exec", argv: ["cat"], stdin: Buffer.from("from stdin\n").toString("base64") }],
    ["env over the defaults, and the defaults", { op: "exec", cmd: 'echo "$FOO $HOME $TERM $LANG $PATH"', env: { FOO: "bar", TERM: "x" } }],
    ["cwd", { op: "exec", argv: ["pwd"], cwd: "/tmp" }],
    ["a missing program", { op: "exec", argv: ["forkd-no-such-program"] }],
    ["a missing program by path", { op: "exec", argv: ["/nonexistent/prog"] }],
    ["killed by a signal", { op: "exec", cmd: "kill -TERM $$" }],
    ["a timeout", { op: "exec", argv: ["sleep", "5"], timeoutMs: 300 }],
    ["a background child holding the pipes", { op: "exec", cmd: "sleep 3 & echo started" }],
    ["escapes and unicode in argv", { op: "exec", argv: ["printf", "%s|%s\\n", 'a "quoted" \\ back', "é ✓ 😀"] }],
  ];
  for (const [name, request] of execCases) {
    it(`exec: ${name}`, async () => {
      const [gate, agent] = [await viaGate(request), await viaAgent(request)];
      expect(comparable(gate)).toEqual(comparable(agent));
    });
  }

  it("exec runs in its own session, as the agent's (detached) spawn does", async () => {
    const request = { op: "exec", cmd: 'test "$(ps -o sid= -p $$ | tr -d " ")" = "$$" && echo own-session' };
    expect(comparable(await viaGate(request))).toEqual(comparable(await viaAgent(request)));
  });

  it("cancel stops a running exec: the cancel answered, then the exec's cancelled error", async () => {
    const id = nextId++;
    h.host.write(encodeFrame({ op: "exec", argv: ["sleep", "10"], id }));
    await new Promise((r) => setTimeout(r, 200));
    h.host.write(encodeFrame({ op: "cancel", target: id, id: id + 1 }));
    nextId++;
    const answers = [await h.answer(), await h.answer()];
    expect(answers).toContainEqual({ id: id + 1, kind: "result", value: { cancelled: true } });
    expect(answers).toContainEqual({ id, kind: "error", code: "cancelled", message: "exec was cancelled by the host" });
  });

  const fileCases: () => [string, Record<string, unknown>][] = () => [
    ["read", { op: "files", action: "read", path: path.join(dir, "hello.txt") }],
    ["read binary, through a path to normalise", { op: "files", action: "read", path: `${dir}//sub/../binary.bin` }],
    ["read through a symlink", { op: "files", action: "read", path: path.join(dir, "link") }],
    ["read a missing file", { op: "files", action: "read", path: path.join(dir, "missing") }],
    ["read a directory", { op: "files", action: "read", path: path.join(dir, "sub") }],
    ["read under a file", { op: "files", action: "read", path: path.join(dir, "hello.txt", "x") }],
    ["stat a file", { op: "files", action: "stat", path: path.join(dir, "hello.txt") }],
    ["stat a directory", { op: "files", action: "stat", path: path.join(dir, "sub") }],
    ["stat a symlink", { op: "files", action: "stat", path: path.join(dir, "link") }],
    ["stat a missing file", { op: "files", action: "stat", path: path.join(dir, "missing") }],
    ["write into a missing directory", { op: "files", action: "write", path: path.join(dir, "nodir", "f"), data: "aGk=" }],
    ["write over a directory", { op: "files", action: "write", path: path.join(dir, "sub"), data: "aGk=" }],
  ];
  it("files: reads, stats and failing writes", async () => {
    for (const [name, request] of fileCases()) {
      expect(comparable(await viaGate(request)), name).toEqual(comparable(await viaAgent(request)));
    }
  });

  it("files: a write (atomic, with its mode) and an append leave the same file", async () => {
    for (const via of ["gate", "agent"] as const) {
      const target = path.join(dir, `written-${via}.txt`);
      const call = via === "gate" ? viaGate : viaAgent;
      const write = comparable(
        await call({ op: "files", action: "write", path: target, data: Buffer.from("one\n").toString("base64"), mode: 0o600 }),
      );
      expect(write).toEqual({ stdout: "", stderr: "", last: { id: 0, kind: "result", value: { path: target, size: 4 } } });
      const append = comparable(
        await call({ op: "files", action: "write", path: target, data: Buffer.from("two\n").toString("base64"), append: true }),
      );
      expect(append).toEqual({ stdout: "", stderr: "", last: { id: 0, kind: "result", value: { path: target, size: 8 } } });
      expect(fs.readFileSync(target, "utf8")).toBe("one\ntwo\n");
      expect(fs.statSync(target).mode & 0o777).toBe(0o600);
      // No temp file left beside it.
      expect(fs.readdirSync(dir).filter((n) => n.endsWith(".tmp"))).toEqual([]);
    }
  });

  it("answered everything itself: nothing was handed to the agent", async () => {
    const ping = await viaGate({ op: "ping" });
    expect(ping[0]).toMatchObject({ kind: "result", value: { stats: { gate: true }, inFlight: 0 } });
  });

  it("hands the port over with a command still running: the agent learns its id, then gets its frames to send", async () => {
    const id = nextId++;
    h.host.write(encodeFrame({ op: "exec", cmd: "sleep 0.3; echo late", id }));
    const evalFrame = encodeFrame({ op: "eval", code: "1", id: nextId++ });
    h.host.write(evalFrame);
    expect(await h.message()).toEqual({ type: "N", payload: Buffer.from(String(id)) });
    const handed = await h.message();
    expect(handed.type).toBe("F");
    expect(handed.payload.equals(evalFrame)).toBe(true);
    const relayed: Record<string, unknown>[] = [];
    while (relayed.at(-1)?.kind !== "result") {
      const m = await h.message();
      expect(m.type).toBe("W");
      expect(m.payload.readUInt32BE(0)).toBe(m.payload.length - 4);
      relayed.push(JSON.parse(m.payload.subarray(4).toString()));
    }
    expect(relayed[0]).toEqual({ id, kind: "chunk", stream: "stdout", data: Buffer.from("late\n").toString("base64") });
    expect(relayed.at(-1)).toMatchObject({ id, kind: "result", value: { exitCode: 0, signal: null, timedOut: false } });
  });
});
