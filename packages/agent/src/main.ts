// Guest entry point: find the virtio-serial port named forkd.agent, then serve
// framed requests on it for the life of the VM.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import { performance as nodePerformance } from "node:perf_hooks";
import { GuestCtl } from "./ops/identity.js";
import { PythonWorker } from "./ops/python.js";
import { AGENT_PORT_NAME, encodeFrame, FrameDecoder, type ResponseFrame } from "./protocol.js";
import { AgentServer } from "./server.js";

const PORTS_DIR = "/sys/class/virtio-ports";
const READ_BUFFER_BYTES = 256 * 1024;
// While no host is connected, read() on the port returns 0 at once (and poll()
// reports HUP), so there is nothing to block on. The port raises SIGIO when a host
// connects; we sleep until then. Under TCG an idle guest that polled would burn
// real host CPU in every one of a hundred children. The slow poll is only a safety net.
const IDLE_POLL_MIN_MS = 1;
const IDLE_POLL_MAX_MS = 25;
const SIGIO_FALLBACK_POLL_MS = 10_000;
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

/** Ask the helper to route the port's SIGIO to us (Node cannot fcntl F_SETOWN/O_ASYNC itself). */
function enableSigio(): void {
  const helper = spawn("/opt/forkd/bin/forkd-guestctl", ["fasync", "3", String(process.pid)], {
    stdio: ["ignore", "ignore", "inherit", fd],
  });
  helper.on("error", () => {});
  helper.on("exit", (code) => {
    sigioEnabled = code === 0;
    if (!sigioEnabled) console.error("forkd-agent: could not enable SIGIO on the agent port; polling instead");
  });
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
  for (let next = queue.shift(); next; next = queue.shift()) {
    await writeAll(next, connection);
    queuedBytes = Math.max(0, queuedBytes - next.length);
    wakeDrained();
  }
  writing = false;
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
  if (!writing) void pump();
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

const guestctl = new GuestCtl("/opt/forkd/bin/forkd-guestctl");
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
        hostLeft();
        decoder = new FrameDecoder();
      }
      waitForHost(sigiosBeforeRead);
      return;
    }
    connected = true;
    idleDelayMs = IDLE_POLL_MIN_MS;
    for (const frame of decoder.push(Buffer.from(readBuffer.subarray(0, bytesRead)))) {
      if (frame.ok) server.handle(frame.message);
      else server.rejectFrame(frame.error);
    }
    readLoop();
  });
}

process.on("uncaughtException", (err) => {
  // Never let one bad call take the agent down; the console log keeps the trace.
  console.error("forkd-agent: uncaught", err);
});
process.on("unhandledRejection", (err) => {
  console.error("forkd-agent: unhandled rejection", err);
});

enableSigio();
readLoop();
