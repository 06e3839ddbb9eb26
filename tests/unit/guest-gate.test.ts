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
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const SOURCE = fileURLToPath(new URL("../../packages/agent/native/forkd-guestctl.c", import.meta.url));

type GateMessage = { type: string; payload: Buffer };

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
    binary = path.join(dir, "forkd-guestctl");
    const cc = spawnSync("cc", ["-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, SOURCE], { encoding: "utf8" });
    expect(cc.status, cc.stderr).toBe(0);
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
  });

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
      encodeFrame({ op: "exec", argv: ["true"], id: 10 }),
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
    h.host.write(encodeFrame({ op: "exec", argv: ["true"], id: 30 }));
    expect((await h.message()).type).toBe("F");
    // Not parked now: what arrives stays on the port.
    h.host.write(encodeFrame({ op: "ping", id: 31 }));
    await new Promise((r) => setTimeout(r, 200));
    h.park(32);
    expect(await h.answer()).toMatchObject({ id: 32, value: { parked: true } });
    expect(await h.answer()).toMatchObject({ id: 31, kind: "result" });
  });

  it("hands over a large frame after its header, leaving the body on the port for the agent", async () => {
    const big = encodeFrame({ op: "files", action: "write", path: "/x", data: "A".repeat(20_000), id: 20 });
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
