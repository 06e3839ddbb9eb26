// Guest entry point: find the virtio-serial port named forkd.agent, then serve
// framed requests on it for the life of the VM.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import { performance as nodePerformance } from "node:perf_hooks";
import { GuestCtl } from "./ops/identity.js";
import { PythonWorker } from "./ops/python.js";
import { AGENT_PORT_NAME, AGENT_VERSION, encodeFrame, FrameDecoder, type ResponseFrame } from "./protocol.js";
import { AgentServer } from "./server.js";

const PORTS_DIR = "/sys/class/virtio-ports";
const READ_BUFFER_BYTES = 256 * 1024;
// While no host is connected, read() on the port returns 0 at once (and poll()
// reports HUP), so there is nothing to block on. The port raises SIGIO when a host
// connects; we sleep until then. Under TCG an idle guest that polled would burn
// real host CPU in every one of a hundred children. The slow poll is only a safety net.
const IDLE_POLL_MIN_MS = 1;
const IDLE_POLL_MAX_MS = 25;
const SIGIO_FALLBACK_POLL_MS = 60_000;
// Right after a disconnect (and so right after a restore) a host usually connects
// within milliseconds: poll briefly with backoff before settling into SIGIO sleep.
const EAGER_POLL_WINDOW_MS = 400;

function findPort(): string {
  for (const entry of fs.readdirSync(PORTS_DIR)) {
    const name = fs.readFileSync(`${PORTS_DIR}/${entry}/name`, "utf8").trim();
    if (name === AGENT_PORT_NAME) return `/dev/${entry}`;
  }
  throw new Error(`no virtio-serial port named ${AGENT_PORT_NAME} under ${PORTS_DIR}`);
}

function openPort(): number {
  for (let attempt = 0; ; attempt++) {
    try {
      return fs.openSync(findPort(), "r+");
    } catch (err) {
      if (attempt >= 200) throw err;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 25);
    }
  }
}

let sigioCount = 0;
let sigioEnabled = false;
let wakeForHost: (() => void) | undefined;
process.on("SIGIO", () => {
  sigioCount++;
  const wake = wakeForHost;
  wakeForHost = undefined;
  wake?.();
});

const fd = openPort();
const GUESTCTL = "/opt/forkd/bin/forkd-guestctl";

// The gate (forkd-guestctl gate): a small C process sharing our port. It routes the
// port's SIGIO to us (Node cannot fcntl F_SETOWN/O_ASYNC itself), and while we are
// parked (the `park` op, sent by the host before a warm snapshot is saved) it reads
// the port instead of us: a restored child's identity and ping are answered by it,
// without waking the JavaScript runtime, and the first other frame comes back to us
// with the port ('F' + length + the bytes it read).
let gate: ChildProcessWithoutNullStreams | undefined;
let parked = false;
let gateBytes: Buffer = Buffer.alloc(0);
// Commands the gate started while it held the port, still running after it handed the port to us:
// their frames come through the gate's pipe ('W') and leave through our queue; cancels for them go
// to the gate. Orphaned ones (their host left, or an identity came) have their frames dropped.
const gateCalls = new Set<number>();
const orphanedGateCalls = new Set<number>();

function startGate(runtimes: string[]): void {
  const child = spawn(GUESTCTL, ["gate", AGENT_VERSION, runtimes.map((r) => JSON.stringify(r)).join(","), String(Date.now())], {
    stdio: ["pipe", "pipe", "inherit", fd],
  }) as unknown as ChildProcessWithoutNullStreams;
  child.on("error", () => {});
  child.stdin.on("error", () => {});
  child.stdout.on("data", (chunk: Buffer) => onGateData(chunk));
  child.on("exit", () => {
    if (gate !== child) return;
    gate = undefined;
    // A gate that dies while it holds the port gives it back with nothing read.
    if (parked) unpark(Buffer.alloc(0));
  });
  gate = child;
}

function onGateData(chunk: Buffer): void {
  gateBytes = gateBytes.length === 0 ? chunk : Buffer.concat([gateBytes, chunk]);
  while (gateBytes.length >= 5) {
    const length = gateBytes.readUInt32BE(1);
    if (gateBytes.length < 5 + length) return;
    const type = String.fromCharCode(gateBytes[0]!);
    const payload = gateBytes.subarray(5, 5 + length);
    gateBytes = gateBytes.subarray(5 + length);
    if (type === "S") sigioEnabled = true;
    else if (type === "s") console.error(`forkd-agent: could not enable SIGIO on the agent port (${payload.toString()}); polling instead`);
    else if (type === "N") gateCalls.add(Number(payload.toString()));
    else if (type === "W") relayGateFrame(Buffer.from(payload));
    else if (type === "F" && parked) unpark(Buffer.from(payload));
  }
}

/** A frame of a command the gate runs, answered after the gate handed us the port: it leaves in our queue. */
function relayGateFrame(frame: Buffer): void {
  let id: number;
  let final: boolean;
  try {
    const message = JSON.parse(frame.subarray(4).toString("utf8")) as { id: number; kind: string };
    id = message.id;
    final = message.kind !== "chunk";
  } catch {
    return;
  }
  if (final) gateCalls.delete(id);
  if (orphanedGateCalls.has(id)) {
    if (final) orphanedGateCalls.delete(id);
    return;
  }
  queue.push(frame);
  queuedBytes += frame.length;
  if (!writing) pump().catch((err: Error) => console.error(`forkd-agent: writing answers failed: ${err.message}`));
  // A slow host holds the gate's command back as it would hold ours: the gate blocks on its pipe.
  if (gate && queuedBytes >= QUEUE_HIGH_BYTES) {
    const paused = gate;
    paused.stdout.pause();
    drainWaiters.push(() => paused.stdout.resume());
  }
}

/**
 * `park`: hand the port to the gate until a frame arrives that only we can answer.
 * Only an idle agent parks (nothing running, nothing buffered): the gate then owns
 * the port alone, and what it answers cannot interleave with our frames.
 */
function park(id: number, lastInRead: boolean): void {
  const busy = !gate
    ? "the agent's gate is not running"
    : server.inFlight > 0 || gateCalls.size > 0 || !lastInRead || decoder.pendingBytes > 0
      ? "park needs an idle agent: calls are running or more frames follow"
      : undefined;
  if (busy) {
    send({ id, kind: "error", code: "agent_busy", message: busy });
    return;
  }
  parked = true;
  // Our answers so far leave first; the gate answers the park itself, then reads the port.
  afterWrites(() => {
    if (gate) gate.stdin.write(`P ${id}\n`);
    else if (parked) unpark(Buffer.alloc(0));
  });
}

function unpark(bytes: Buffer): void {
  parked = false;
  connected = true;
  decoder = new FrameDecoder();
  handleBytes(bytes);
  if (!parked) readLoop();
}
// Answers leave through one queue, one frame at a time. It is measured so exec
// output can wait for a slow host (see OutputFlow), and it is emptied when the host
// hangs up: what it held was for that host, and the next one never asked for it.
const QUEUE_HIGH_BYTES = 1024 * 1024;
const queue: Buffer[] = [];
let queuedBytes = 0;
let writing = false;
let connection = 0;
const drainWaiters: (() => void)[] = [];
const writesDoneWaiters: (() => void)[] = [];

function afterWrites(fn: () => void): void {
  if (!writing && queue.length === 0) fn();
  else writesDoneWaiters.push(fn);
}

function writeAll(buffer: Buffer, forConnection: number): Promise<void> {
  return new Promise((resolve) => {
    const step = (offset: number) => {
      // A frame half written when its host left is not finished for the next one.
      if (offset >= buffer.length || connection !== forConnection) return resolve();
      fs.write(fd, buffer, offset, buffer.length - offset, null, (err, written) => {
        // A write fails when the host has gone away; its answer has nobody to read it.
        if (err) return resolve();
        step(offset + written);
      });
    };
    step(0);
  });
}

function wakeDrained(): void {
  if (queuedBytes >= QUEUE_HIGH_BYTES / 2) return;
  for (const wake of drainWaiters.splice(0)) wake();
}

async function pump(): Promise<void> {
  writing = true;
  try {
    for (let next = queue.shift(); next; next = queue.shift()) {
      await writeAll(next, connection);
      queuedBytes = Math.max(0, queuedBytes - next.length);
      wakeDrained();
    }
  } finally {
    // Even after a failure: a pump stuck "writing" would never send another answer.
    writing = false;
    for (const fn of writesDoneWaiters.splice(0)) fn();
  }
}

function send(frame: ResponseFrame): void {
  let bytes: Buffer;
  try {
    bytes = encodeFrame(frame);
  } catch (err) {
    bytes = encodeFrame({ id: frame.id, kind: "error", code: "too_large", message: (err as Error).message });
  }
  queue.push(bytes);
  queuedBytes += bytes.length;
  if (!writing) pump().catch((err: Error) => console.error(`forkd-agent: writing answers failed: ${err.message}`));
}

function hostLeft(): void {
  connection++;
  queue.length = 0;
  queuedBytes = 0;
  wakeDrained();
}

// Started at boot so the interpreter and its imports are warm in every snapshot.
const PYTHON = "/usr/bin/python3";
const PYWORKER = "/opt/forkd/pyworker.py";
const python = PythonWorker.available(PYTHON, PYWORKER)
  ? new PythonWorker({ python: PYTHON, script: PYWORKER, imports: process.env.FORKD_PY_IMPORTS ?? "numpy" })
  : undefined;
python?.start().catch((err: Error) => console.error(`forkd-agent: ${err.message}`));

const guestctl = new GuestCtl(GUESTCTL);
guestctl.start();
const server = new AgentServer(send, {
  identity: { guestctl, hostnameFile: "/proc/sys/kernel/hostname" },
  ...(python ? { python } : {}),
  hostname: () => os.hostname(),
  flow: { full: () => queuedBytes >= QUEUE_HIGH_BYTES, drained: () => new Promise<void>((r) => drainWaiters.push(r)) },
  stats: () => {
    const usage = process.resourceUsage();
    const elu = nodePerformance.eventLoopUtilization();
    return {
      portReads,
      sigioCount,
      sigioEnabled,
      cpuMs: Math.round((usage.userCPUTime + usage.systemCPUTime) / 1000),
      voluntarySwitches: usage.voluntaryContextSwitches,
      loopActiveMs: Math.round(elu.active),
      loopIdleMs: Math.round(elu.idle),
    };
  },
});

let decoder = new FrameDecoder();
let connected = false;
let idleDelayMs = IDLE_POLL_MIN_MS;
const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);

function waitForHost(sigiosBeforeRead: number): void {
  if (sigioCount !== sigiosBeforeRead) {
    // A host connected while our read was returning 0: try again now.
    setImmediate(readLoop);
    return;
  }
  if (sigioEnabled && performance.now() - disconnectedAt > EAGER_POLL_WINDOW_MS) {
    const timer = setTimeout(() => {
      wakeForHost = undefined;
      readLoop();
    }, SIGIO_FALLBACK_POLL_MS);
    wakeForHost = () => {
      clearTimeout(timer);
      readLoop();
    };
    return;
  }
  setTimeout(readLoop, idleDelayMs);
  idleDelayMs = Math.min(idleDelayMs * 2, IDLE_POLL_MAX_MS);
}

let portReads = 0;
let disconnectedAt = 0;

function readLoop(): void {
  portReads++;
  const sigiosBeforeRead = sigioCount;
  fs.read(fd, readBuffer, 0, readBuffer.length, null, (err, bytesRead) => {
    if (err || bytesRead === 0) {
      if (connected || disconnectedAt === 0) {
        disconnectedAt = performance.now();
        idleDelayMs = IDLE_POLL_MIN_MS;
      }
      if (connected) {
        // The host hung up: nobody will read the answers of what it started.
        connected = false;
        server.abortAll();
        abortGateCalls();
        hostLeft();
        decoder = new FrameDecoder();
      }
      waitForHost(sigiosBeforeRead);
      return;
    }
    connected = true;
    idleDelayMs = IDLE_POLL_MIN_MS;
    handleBytes(Buffer.from(readBuffer.subarray(0, bytesRead)));
    // Parked: the gate reads the port from here on.
    if (!parked) readLoop();
  });
}

function handleBytes(bytes: Buffer): void {
  const frames = decoder.push(bytes);
  for (const [i, frame] of frames.entries()) {
    if (frame.ok && isParkRequest(frame.message)) park(frame.message.id, i === frames.length - 1);
    else if (frame.ok && isClockRequest(frame.message)) setClock(frame.message.id, frame.message.clockMs);
    else if (frame.ok && gateCalls.size > 0 && forGateCall(frame.message)) continue;
    else if (frame.ok) server.handle(frame.message);
    else server.rejectFrame(frame.error);
  }
}

/** Stop the gate's commands and drop their frames: their host left. */
function abortGateCalls(): void {
  for (const id of gateCalls) orphanedGateCalls.add(id);
  if (gateCalls.size > 0) gate?.stdin.write("A\n");
}

/**
 * A frame that concerns a command the gate runs: a cancel of it (forwarded), a request reusing its
 * id (refused as the server refuses one of its own), an identity (its output is for a host this
 * child never had). True when answered here.
 */
function forGateCall(message: unknown): boolean {
  const m = message as { op?: unknown; id?: unknown; target?: unknown } | null;
  if (typeof m !== "object" || m === null || typeof m.id !== "number" || !Number.isSafeInteger(m.id)) return false;
  if (m.op === "cancel" && typeof m.target === "number" && gateCalls.has(m.target)) {
    gate?.stdin.write(`C ${m.target}\n`);
    send({ id: m.id, kind: "result", value: { cancelled: true } });
    return true;
  }
  if (m.op !== "cancel" && gateCalls.has(m.id)) {
    send({ id: m.id, kind: "error", code: "bad_request", message: `request id ${m.id} is already in flight` });
    return true;
  }
  if (m.op === "identity") for (const id of gateCalls) orphanedGateCalls.add(id);
  return false;
}

/**
 * `clock`: the host's wall clock, sent again before a call after a long silence (a
 * guest keeps time with its TSC at the rate the host gave it at boot). Unlike
 * identity it changes nothing else: calls running for this host keep running.
 */
function setClock(id: number, clockMs: unknown): void {
  if (typeof clockMs !== "number" || !Number.isFinite(clockMs) || clockMs <= 0) {
    send({ id, kind: "error", code: "bad_request", message: "`clockMs` must be milliseconds since the epoch" });
    return;
  }
  guestctl.request(`T ${Math.round(clockMs)}`).then(
    () => send({ id, kind: "result", value: { applied: ["clock"] } }),
    (err: Error) => send({ id, kind: "error", code: "io_error", message: err.message }),
  );
}

function isClockRequest(message: unknown): message is { op: "clock"; id: number; clockMs: unknown } {
  const m = message as { op?: unknown; id?: unknown } | null;
  return typeof m === "object" && m !== null && m.op === "clock" && Number.isSafeInteger(m.id);
}

function isParkRequest(message: unknown): message is { op: "park"; id: number } {
  const m = message as { op?: unknown; id?: unknown } | null;
  return typeof m === "object" && m !== null && m.op === "park" && Number.isSafeInteger(m.id);
}

process.on("uncaughtException", (err) => {
  // Never let one bad call take the agent down; the console log keeps the trace.
  console.error("forkd-agent: uncaught", err);
});
process.on("unhandledRejection", (err) => {
  console.error("forkd-agent: unhandled rejection", err);
});

startGate(python ? ["javascript", "python"] : ["javascript"]);
readLoop();
