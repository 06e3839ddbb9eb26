// bench fuzz: requests generated from the daemon's own OpenAPI document and mutated
// (fuzz-gen.ts), sent over raw TCP to a real daemon process that has live
// sandboxes. Bad input must get a 4xx: every 5xx is reported with the request that
// caused it. At the end the daemon must still run and answer, and so must its sandboxes.
import { randomBytes } from "node:crypto";
import net from "node:net";
import type { Command } from "commander";
import fc from "fast-check";
import { parseIntOption, spinner } from "../../ui.js";
import { startDaemonUnderTest } from "./daemon-under-test.js";
import { type FuzzRequest, type Known, type OpenApiDoc, operations, requestArbitrary } from "./fuzz-gen.js";
import { emit, machine } from "./report.js";

type FuzzAnswer = { status: number | null; head: string; body: string; error?: string };

/** One request on its own connection, exactly as built (no client fixing up what the fuzzer broke). */
function sendRaw(port: number, req: FuzzRequest, timeoutMs: number): Promise<FuzzAnswer> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ host: "127.0.0.1", port });
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (error?: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      const text = Buffer.concat(chunks).toString("latin1");
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(text);
      const headEnd = text.indexOf("\r\n\r\n");
      resolve({
        status: m ? Number(m[1]) : null,
        head: headEnd >= 0 ? text.slice(0, headEnd) : text.slice(0, 500),
        body:
          headEnd >= 0
            ? Buffer.concat(chunks)
                .subarray(headEnd + 4, headEnd + 4 + 2000)
                .toString("utf8")
            : "",
        ...(error ? { error } : {}),
      });
    };
    const timer = setTimeout(() => finish("timeout"), timeoutMs);
    socket.on("data", (d: Buffer) => {
      // The status line and a bit of the body are all that is judged; streams may be long.
      if (size < 64 * 1024) chunks.push(d);
      size += d.length;
      // An event stream (GET /v1/events) never ends by design: its head is the answer.
      const text = Buffer.concat(chunks).toString("latin1");
      if (text.includes("\r\n\r\n") && /^content-type: text\/event-stream/im.test(text.slice(0, text.indexOf("\r\n\r\n")))) finish();
    });
    socket.on("end", () => finish());
    socket.on("close", () => finish());
    socket.on("error", (err) => finish(err.message));
    socket.on("connect", () => {
      const lines = [`${req.method} ${req.target} HTTP/1.1`, "Host: 127.0.0.1", "Connection: close"];
      for (const [k, v] of Object.entries(req.headers)) lines.push(`${k}: ${v}`);
      if (req.body) lines.push(`Content-Length: ${req.body.length}`);
      socket.write(Buffer.concat([Buffer.from(`${lines.join("\r\n")}\r\n\r\n`, "latin1"), req.body ?? Buffer.alloc(0)]));
    });
  });
}

function describe(req: FuzzRequest): Record<string, unknown> {
  const body = req.body?.toString("utf8") ?? null;
  return {
    op: req.op,
    mutation: req.mutation,
    method: req.method,
    target: req.target.length > 300 ? `${req.target.slice(0, 300)}…[${req.target.length} chars]` : req.target,
    content_type: req.headers["content-type"] ?? null,
    body: body && body.length > 1000 ? `${body.slice(0, 1000)}…[${body.length} bytes]` : body,
  };
}

export function registerFuzzBench(bench: Command): void {
  bench
    .command("fuzz")
    .description(
      "requests generated from GET /v1/openapi.json with fast-check and mutated (wrong types, missing/extra fields, huge values, bad ids, content types, truncated bodies, huge queries) against a daemon with live sandboxes: no 5xx, still answering",
    )
    .option("--requests <n>", "requests to send", parseIntOption("--requests"), 1000)
    .option("--seed <n>", "fast-check seed (the run is the same for the same seed and daemon)", parseIntOption("--seed"))
    .option("--concurrency <n>", "requests in flight at once", parseIntOption("--concurrency"), 4)
    .option("--json", "print JSON")
    .action(async (opts: { requests: number; seed?: number; concurrency: number; json?: boolean }) => {
      const seed = opts.seed ?? randomBytes(4).readUInt32BE() >>> 1;
      const s = spinner("starting a daemon");
      const daemon = await startDaemonUnderTest({ prefix: "fuzz" });
      const tag = `fuzz-${randomBytes(3).toString("hex")}`;
      try {
        const c = daemon.controller();
        s.text = "warm snapshot and live sandboxes";
        await c.createSnapshot({ tag, memory_mib: 128 });
        const live = await c.createSandboxes({ snapshot_tag: tag, n: 2 });
        // A process that has exited: the process routes then have a real pid to be fuzzed with.
        const bg = await c.execBackground(live[0]!.id, { cmd: "echo fuzz" });
        const known: Known = { sandboxIds: live.map((x) => x.id), tags: [tag], pids: [String(bg.pid)] };
        const doc = (await c.openapi()) as unknown as OpenApiDoc;
        const ops = operations(doc);
        const requests = fc.sample(requestArbitrary(ops, known, daemon.token), { numRuns: opts.requests, seed });
        const byStatus: Record<string, number> = {};
        const byMutation: Record<string, number> = {};
        const examples5xx: Record<string, unknown>[] = [];
        const noAnswer: Record<string, unknown>[] = [];
        let next = 0;
        let sent = 0;
        const worker = async () => {
          while (next < requests.length) {
            const req = requests[next++]!;
            const answer = await sendRaw(daemon.port, req, 120_000);
            sent++;
            if (sent % 25 === 0) s.text = `request ${sent}/${requests.length}`;
            const key = answer.status === null ? "none" : String(answer.status);
            byStatus[key] = (byStatus[key] ?? 0) + 1;
            byMutation[req.mutation] = (byMutation[req.mutation] ?? 0) + 1;
            if (answer.status !== null && answer.status >= 500) {
              if (examples5xx.length < 20)
                examples5xx.push({ request: describe(req), status: answer.status, response: answer.body.slice(0, 1000) });
            } else if (answer.status === null && noAnswer.length < 10) {
              noAnswer.push({ request: describe(req), error: answer.error ?? "closed without an answer" });
            }
          }
        };
        await Promise.all(Array.from({ length: Math.max(1, opts.concurrency) }, worker));
        s.text = "checking the daemon and its sandboxes";
        const count = (lo: number, hi: number) =>
          Object.entries(byStatus)
            .filter(([k]) => k !== "none" && Number(k) >= lo && Number(k) < hi)
            .reduce((sum, [, v]) => sum + v, 0);
        const health = await fetch(`${daemon.url}/healthz`).then(
          (r) => r.status,
          () => 0,
        );
        const answering: boolean[] = [];
        for (const sandbox of live)
          answering.push(
            await c.ping(sandbox.id).then(
              () => true,
              () => false,
            ),
          );
        s.stop();
        const result = {
          ...(await machine()),
          requests: requests.length,
          seed,
          operations: ops.length,
          responses_2xx: count(200, 300),
          responses_3xx: count(300, 400),
          responses_4xx: count(400, 500),
          responses_5xx: count(500, 600),
          no_answer: byStatus.none ?? 0,
          by_status: byStatus,
          by_mutation: byMutation,
          examples_5xx: examples5xx,
          examples_no_answer: noAnswer,
          daemon_alive: daemon.alive(),
          daemon_answering: health === 200,
          sandboxes_answering: answering.filter(Boolean).length,
          sandboxes_live: live.length,
        };
        emit("fuzz", result, opts, (r) => {
          const lines = [
            `requests ${r.requests} (seed ${r.seed}, ${r.operations} operations): 2xx ${r.responses_2xx}, 4xx ${r.responses_4xx}, 5xx ${r.responses_5xx}, no answer ${r.no_answer}`,
            `daemon alive ${r.daemon_alive}, answering ${r.daemon_answering}, sandboxes answering ${r.sandboxes_answering}/${r.sandboxes_live}`,
            `by status ${JSON.stringify(r.by_status)}`,
          ];
          for (const e of r.examples_5xx as unknown[]) lines.push(`5xx: ${JSON.stringify(e)}`);
          return lines.join("\n");
        });
        if (result.responses_5xx > 0 || !result.daemon_alive || !result.daemon_answering || result.sandboxes_answering < live.length) {
          process.exitCode = 1;
        }
      } finally {
        s.stop();
        await daemon.stop();
      }
    });
}
