// The QMP client against a scripted QEMU over a real unix socket (no VM). A QEMU
// taken over by its guest writes whatever it likes on this socket: every line must
// be bounded and checked, a bad peer loses the connection with a typed error, and
// nothing it sends throws out of a socket listener (vitest fails a run on any
// uncaught exception, so each case below also proves that).
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { isForkdError, MAX_QMP_EVENTS_PER_SECOND, MAX_QMP_LINE_CHARS, QmpClient, type QmpEvent } from "@forkd/core";
import { afterAll, afterEach, describe, expect, it } from "vitest";

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}';
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-qmp-"));
const servers: net.Server[] = [];

type Command = { execute: string; id: number; arguments?: unknown };
type Script = { greeting?: string; onCommand?: (cmd: Command, peer: net.Socket) => void };

/** A fake QEMU: greets, answers qmp_capabilities, then lets `onCommand` answer (or misbehave). */
async function fakeQemu(script: Script = {}): Promise<string> {
  const socketPath = path.join(dir, `qmp-${servers.length}.sock`);
  const server = net.createServer((peer) => {
    peer.on("error", () => {});
    peer.write(`${script.greeting ?? GREETING}\n`);
    let buffer = "";
    peer.on("data", (chunk) => {
      buffer += chunk.toString("utf8");
      for (let nl = buffer.indexOf("\n"); nl >= 0; nl = buffer.indexOf("\n")) {
        const cmd = JSON.parse(buffer.slice(0, nl)) as Command;
        buffer = buffer.slice(nl + 1);
        if (cmd.execute === "qmp_capabilities") peer.write(`{"return": {}, "id": ${cmd.id}}\n`);
        else script.onCommand?.(cmd, peer);
      }
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return socketPath;
}

/** Connect, run query-status, and let the fake answer it with `lines`. */
async function answeredWith(lines: string | ((id: number) => string)) {
  const socketPath = await fakeQemu({
    onCommand: (cmd, peer) => peer.write(typeof lines === "function" ? lines(cmd.id) : lines),
  });
  const qmp = await QmpClient.connect(socketPath, { timeoutMs: 5000 });
  const outcome = await qmp.execute("query-status", {}, { timeoutMs: 5000 }).then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );
  return { qmp, outcome };
}

afterEach(() => {
  for (const s of servers.splice(0)) s.close();
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("QMP from a hostile QEMU", () => {
  it("answers as QEMU does: the command resolves, events reach listeners, a throwing listener harms nobody", async () => {
    const socketPath = await fakeQemu({
      onCommand: (cmd, peer) => {
        peer.write('{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\n');
        peer.write(`{"return": {"status": "paused", "running": false}, "id": ${cmd.id}}\n`);
      },
    });
    const qmp = await QmpClient.connect(socketPath);
    const seen: QmpEvent[] = [];
    qmp.on("event", () => {
      throw new Error("a listener's own bug");
    });
    qmp.on("event", (e) => seen.push(e));
    expect(await qmp.execute("query-status", {})).toEqual({ status: "paused", running: false });
    expect(seen.map((e) => e.event)).toEqual(["STOP"]);
    expect(qmp.isClosed).toBe(false);
    qmp.close();
  });

  const hostile: [string, (id: number) => string, RegExp][] = [
    ["null", () => "null\n", /not a JSON object \(null\)/],
    ["an array", () => "[1,2]\n", /not a JSON object \(an array\)/],
    ["a number", () => "42\n", /not a JSON object \(number\)/],
    ["a string", () => '"hello"\n', /not a JSON object \(string\)/],
    ["invalid JSON", () => '{"return": \n', /not JSON/],
    ["an event named by a number", () => '{"event": 5, "timestamp": {"seconds": 1, "microseconds": 0}}\n', /event whose name/],
    ["an event without a timestamp", () => '{"event": "STOP"}\n', /without a timestamp/],
    [
      "an event whose data is null",
      () => '{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}, "data": null}\n',
      /data is not an object/,
    ],
    ["an error that is a string", (id) => `{"error": "boom", "id": ${id}}\n`, /without a class/],
    ["neither event nor answer", (id) => `{"id": ${id}}\n`, /neither an event nor an answer/],
    ["an id never sent", () => '{"return": {}, "id": 99999}\n', /id 99999, which was never sent/],
    ["an id that is not a number", () => '{"return": {}, "id": "x"}\n', /id is not a whole number/],
    ["a null return for query-status", (id) => `{"return": null, "id": ${id}}\n`, /not what QMP returns for it/],
    ["a query-status return without a status", (id) => `{"return": {"running": true}, "id": ${id}}\n`, /not what QMP returns/],
  ];
  for (const [name, line, reason] of hostile) {
    it(`${name}: the connection closes, the call fails with qmp_error naming why`, async () => {
      const { qmp, outcome } = await answeredWith(line);
      expect(outcome.ok).toBe(false);
      expect(isForkdError(!outcome.ok && outcome.error, "qmp_error")).toBe(true);
      expect(String(!outcome.ok && (outcome.error as Error).message)).toMatch(/broke the QMP protocol/);
      expect(qmp.violation).toMatch(reason);
      expect(qmp.isClosed).toBe(true);
      await expect(qmp.execute("query-status", {})).rejects.toThrow(/closed \(QEMU broke the protocol/);
    });
  }

  it("a line longer than the bound, sent without a newline, is refused before it is all buffered", async () => {
    const socketPath = await fakeQemu({
      onCommand: (_cmd, peer) => {
        const piece = "x".repeat(1 << 20);
        const send = (left: number) => {
          if (left === 0 || peer.destroyed) return;
          peer.write(piece, () => send(left - 1));
        };
        send(MAX_QMP_LINE_CHARS / piece.length + 4);
      },
    });
    const qmp = await QmpClient.connect(socketPath);
    await expect(qmp.execute("query-status", {}, { timeoutMs: 20_000 })).rejects.toThrow(/longer than/);
    expect(qmp.violation).toMatch(new RegExp(`longer than ${MAX_QMP_LINE_CHARS}`));
  });

  it("a flood of events is cut off at the budget", async () => {
    const event = '{"event": "RTC_CHANGE", "timestamp": {"seconds": 1, "microseconds": 0}, "data": {"offset": 0}}\n';
    const { qmp, outcome } = await answeredWith(() => event.repeat(MAX_QMP_EVENTS_PER_SECOND + 50));
    expect(outcome.ok).toBe(false);
    expect(qmp.violation).toMatch(/events in one second/);
  });

  it("a flood of stray answers (lines without an id) is cut off too", async () => {
    const { qmp, outcome } = await answeredWith(() => '{"return": {}}\n'.repeat(1000));
    expect(outcome.ok).toBe(false);
    expect(qmp.violation).toMatch(/answers nobody waits for/);
  });

  it("a late answer to a command that timed out is tolerated", async () => {
    let first = true;
    const socketPath = await fakeQemu({
      onCommand: (cmd, peer) => {
        if (first) {
          first = false;
          setTimeout(() => peer.write(`{"return": {"status": "running", "running": true}, "id": ${cmd.id}}\n`), 300);
          return;
        }
        peer.write(`{"return": {"status": "running", "running": true}, "id": ${cmd.id}}\n`);
      },
    });
    const qmp = await QmpClient.connect(socketPath);
    await expect(qmp.execute("query-status", {}, { timeoutMs: 50 })).rejects.toThrow(/did not answer/);
    await new Promise((r) => setTimeout(r, 400));
    expect(qmp.isClosed).toBe(false);
    expect((await qmp.execute("query-status", {})).status).toBe("running");
    qmp.close();
  });

  for (const [name, greeting] of [
    ["null", "null"],
    ["not JSON", "{QMP"],
    ["without a version", '{"QMP": {}}'],
  ] as const) {
    it(`a greeting that is ${name} fails the connect with qmp_error`, async () => {
      const socketPath = await fakeQemu({ greeting });
      const err = await QmpClient.connect(socketPath, { timeoutMs: 3000 }).catch((e: unknown) => e);
      expect(isForkdError(err, "qmp_error")).toBe(true);
      expect((err as Error).message).toMatch(/did not greet like QMP/);
    });
  }
});
