// The envd plane's own parsers, with no VM: Connect's envelopes (split anywhere,
// oversize refused from the header, compressed or unknown flags refused), the stream
// request rule, the timeout and keepalive headers, a stream's bound for a client that
// stops reading, multipart bodies (split anywhere, hostile ones refused), E2B's URL
// signatures, envd's end events and the agent's watch lines.
import { createHash } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import {
  ConnectError,
  decodeStreamRequest,
  EnvelopeReader,
  encodeEnvelope,
  endEvent,
  endStreamEnvelope,
  FLAG_END_STREAM,
  fileSignature,
  MAX_REQUEST_MESSAGE_BYTES,
  messageEnvelope,
  parseKeepaliveMs,
  parseTimeoutMs,
  readMultipart,
  ServerStream,
  WatchLineParser,
} from "@forkd/e2b/envd";
import { describe, expect, it } from "vitest";

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ConnectError ? err.code : `not a ConnectError: ${String(err)}`;
  }
  return undefined;
}

describe("Connect envelopes", () => {
  it("round-trips messages however the bytes are split", () => {
    const bytes = Buffer.concat([messageEnvelope({ a: 1 }), messageEnvelope({ b: "x".repeat(300) }), endStreamEnvelope()]);
    for (const step of [1, 2, 5, 7, 64, bytes.length]) {
      const reader = new EnvelopeReader();
      const got = [];
      for (let i = 0; i < bytes.length; i += step) got.push(...reader.push(bytes.subarray(i, i + step)));
      expect(got.map((e) => [e.flags, JSON.parse(e.payload.toString())])).toEqual([
        [0, { a: 1 }],
        [0, { b: "x".repeat(300) }],
        [FLAG_END_STREAM, {}],
      ]);
      expect(reader.pendingBytes).toBe(0);
    }
  });

  it("refuses an oversize envelope from its header alone, before any body arrives", () => {
    const header = Buffer.alloc(5);
    header.writeUInt32BE(MAX_REQUEST_MESSAGE_BYTES + 1, 1);
    expect(codeOf(() => new EnvelopeReader().push(header))).toBe("resource_exhausted");
    header.writeUInt32BE(0xffffffff, 1);
    expect(codeOf(() => new EnvelopeReader(1024).push(header))).toBe("resource_exhausted");
  });

  it("refuses compressed envelopes and flags Connect does not define", () => {
    expect(codeOf(() => new EnvelopeReader().push(encodeEnvelope(0x01, Buffer.from("{}"))))).toBe("internal");
    expect(codeOf(() => new EnvelopeReader().push(encodeEnvelope(0x80, Buffer.from("{}"))))).toBe("invalid_argument");
  });

  it("a stream request is exactly one message envelope holding a JSON object", () => {
    expect(decodeStreamRequest(messageEnvelope({ path: "/x" }))).toEqual({ path: "/x" });
    expect(codeOf(() => decodeStreamRequest(Buffer.alloc(0)))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(Buffer.concat([messageEnvelope({}), messageEnvelope({})])))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(messageEnvelope({}).subarray(0, 6)))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(endStreamEnvelope()))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(encodeEnvelope(0, Buffer.from("[1]"))))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(encodeEnvelope(0, Buffer.from("{nope"))))).toBe("invalid_argument");
    expect(codeOf(() => decodeStreamRequest(encodeEnvelope(0, Buffer.from("null"))))).toBe("invalid_argument");
  });

  it("an end-stream message carries the error as code and message, and metadata as lists", () => {
    const env = endStreamEnvelope(new ConnectError("not_found", "gone"), { "x-a": "1" });
    expect(env[0]).toBe(FLAG_END_STREAM);
    expect(env.readUInt32BE(1)).toBe(env.length - 5);
    expect(JSON.parse(env.subarray(5).toString())).toEqual({ error: { code: "not_found", message: "gone" }, metadata: { "x-a": ["1"] } });
  });

  it("Connect-Timeout-Ms is 1-10 digits and positive; the keepalive interval is clamped", () => {
    expect(parseTimeoutMs(undefined)).toBeUndefined();
    expect(parseTimeoutMs("60000")).toBe(60000);
    expect(parseTimeoutMs("1500.0")).toBe(1500); // E2B's Python SDK
    expect(parseTimeoutMs("0.5")).toBe(1);
    for (const bad of ["0", "0.0", "-1", "1e3", "12345678901", " 5", "", "1."])
      expect(codeOf(() => parseTimeoutMs(bad))).toBe("invalid_argument");
    expect(parseKeepaliveMs("50", 1)).toBe(50_000);
    expect(parseKeepaliveMs("0", 7)).toBe(1000);
    expect(parseKeepaliveMs("999999", 7)).toBe(600_000);
    expect(parseKeepaliveMs("x", 7)).toBe(7);
  });
});

describe("a server stream", () => {
  it("holds at most its buffer for a client that stops reading, counting what it dropped; start and end always go", async () => {
    let stream: ServerStream | undefined;
    const server = http.createServer((_req, res) => {
      stream = new ServerStream(res, 64 * 1024);
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as AddressInfo).port;
    const req = http.request({ port, host: "127.0.0.1", method: "POST" });
    req.end();
    const res = await new Promise<http.IncomingMessage>((r) => req.on("response", r));
    res.pause();
    stream!.send({ start: true });
    const chunk = { data: "y".repeat(16 * 1024) };
    for (let i = 0; i < 400; i++) stream!.send(chunk, true);
    // Nothing read: what waits in the daemon stays near the bound (the socket's own buffers aside).
    expect((stream as unknown as { res: http.ServerResponse }).res.writableLength).toBeLessThan(64 * 1024 + 17 * 1024);
    expect(stream!.dropped).toBeGreaterThan(4 * 1024 * 1024);
    stream!.end();
    res.resume();
    const body: Buffer[] = [];
    for await (const c of res) body.push(c as Buffer);
    const got = new EnvelopeReader(1 << 20).push(Buffer.concat(body));
    expect(JSON.parse(got[0]!.payload.toString())).toEqual({ start: true });
    const last = got.at(-1)!;
    expect(last.flags).toBe(FLAG_END_STREAM);
    expect(JSON.parse(last.payload.toString()).metadata["x-forkd-dropped-bytes"][0]).toBe(String(stream!.dropped));
    server.close();
  });
});

async function* pieces(buf: Buffer, step: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += step) yield buf.subarray(i, i + step);
}

async function collect(body: Buffer, boundary: string, step: number) {
  const out: { name?: string; filename?: string; data: string }[] = [];
  for await (const part of readMultipart(pieces(body, step), boundary)) {
    const chunks: Buffer[] = [];
    for await (const c of part.body) chunks.push(c);
    out.push({ name: part.name, filename: part.filename, data: Buffer.concat(chunks).toString("latin1") });
  }
  return out;
}

describe("multipart bodies", () => {
  const boundary = "----formdata-undici-0123";
  const body = Buffer.from(
    `preamble\r\n--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="/home/user/a%22b.txt"\r\nContent-Type: application/octet-stream\r\n\r\n` +
      `line1\r\n--${boundary.slice(0, 5)} not a boundary\r\n` +
      `\r\n--${boundary}\r\nContent-Disposition: form-data; name="other"\r\n\r\nignored` +
      `\r\n--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="rel/b.bin"\r\n\r\n\x00\x01\xff` +
      `\r\n--${boundary}--\r\nepilogue`,
    "latin1",
  );

  it("yields each part's name, filename and exact bytes, however the body is split", async () => {
    for (const step of [1, 3, 17, body.length]) {
      expect(await collect(body, boundary, step)).toEqual([
        { name: "file", filename: '/home/user/a"b.txt', data: `line1\r\n--${boundary.slice(0, 5)} not a boundary\r\n` },
        { name: "other", filename: undefined, data: "ignored" },
        { name: "file", filename: "rel/b.bin", data: "\x00\x01\xff" },
      ]);
    }
  });

  it("refuses a body cut short, one with no boundary, and headers without end", async () => {
    await expect(collect(body.subarray(0, body.length - 20), boundary, 7)).rejects.toThrow(/ends inside a part|closing boundary/);
    await expect(collect(Buffer.from("no parts here"), boundary, 4)).rejects.toThrow(/no boundary/);
    const endless = Buffer.concat([Buffer.from(`--${boundary}\r\n`), Buffer.alloc(64 * 1024, 0x41)]);
    await expect(collect(endless, boundary, 4096)).rejects.toThrow(/headers are over/);
  });
});

describe("E2B's /files signatures", () => {
  it("are v1_ and the unpadded base64 SHA-256 of path:operation:user:token[:expiration], as the SDK makes them", () => {
    const sha = (s: string) => createHash("sha256").update(s).digest("base64").replace(/=+$/, "");
    expect(fileSignature("/home/user/a.txt", "read", "user", "tok")).toBe(`v1_${sha("/home/user/a.txt:read:user:tok")}`);
    expect(fileSignature("p", "write", "", "tok", 1700000000)).toBe(`v1_${sha("p:write::tok:1700000000")}`);
    expect(fileSignature("p", "read", "", "tok")).not.toBe(fileSignature("p", "write", "", "tok"));
  });
});

describe("end events and watch lines", () => {
  it("end events carry Go's exit code and status texts", () => {
    expect(endEvent({ exitCode: 0, signal: null })).toEqual({ exitCode: 0, exited: true, status: "exit status 0" });
    expect(endEvent({ exitCode: 3, signal: null })).toEqual({ exitCode: 3, exited: true, status: "exit status 3", error: "exit status 3" });
    expect(endEvent({ exitCode: null, signal: "SIGKILL" })).toEqual({
      exitCode: -1,
      exited: false,
      status: "signal: killed",
      error: "signal: killed",
    });
    expect(endEvent({ exitCode: null, signal: "SIGTERM" }).status).toBe("signal: terminated");
  });

  it("the agent's watch lines: a start naming the directory first, then events; anything else ends the watch", () => {
    const p = new WatchLineParser(100);
    expect(p.push(Buffer.from('{"type":"start","path":"/home/user"}\n{"type":"cre'))).toEqual({ events: [], dropped: 0, started: true });
    expect(p.push(Buffer.from('ate","name":"a"}\n{"type":"dropped","count":3}\n')).events).toEqual([{ type: "create", name: "a" }]);
    expect(codeOf(() => new WatchLineParser().push(Buffer.from('{"type":"create","name":"a"}\n')))).toBe("internal");
    expect(codeOf(() => p.push(Buffer.from('{"type":"explode","name":"a"}\n')))).toBe("internal");
    expect(codeOf(() => p.push(Buffer.from("not json\n")))).toBe("internal");
    expect(codeOf(() => new WatchLineParser(100).push(Buffer.from("x".repeat(200))))).toBe("internal");
  });
});
