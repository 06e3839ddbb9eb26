// Guest entry point: find the virtio-serial port named forkd.agent, then serve
// framed requests on it for the life of the VM.
import fs from "node:fs";
import os from "node:os";
import { GuestCtl } from "./ops/identity.js";
import { AGENT_PORT_NAME, encodeFrame, FrameDecoder, type ResponseFrame } from "./protocol.js";
import { AgentServer } from "./server.js";

const PORTS_DIR = "/sys/class/virtio-ports";
const READ_BUFFER_BYTES = 256 * 1024;
// While no host is connected, read() on the port returns 0 at once; back off
// between tries so an idle, unattached guest costs little CPU (this matters under TCG),
// yet a freshly restored child notices its host within a few milliseconds.
const IDLE_POLL_MIN_MS = 1;
const IDLE_POLL_MAX_MS = 25;

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

const fd = openPort();
let writeChain: Promise<void> = Promise.resolve();

function writeAll(buffer: Buffer): Promise<void> {
  return new Promise((resolve) => {
    const step = (offset: number) => {
      if (offset >= buffer.length) return resolve();
      fs.write(fd, buffer, offset, buffer.length - offset, null, (err, written) => {
        // A write fails when the host has gone away; its answer has nobody to read it.
        if (err) return resolve();
        step(offset + written);
      });
    };
    step(0);
  });
}

function send(frame: ResponseFrame): void {
  let bytes: Buffer;
  try {
    bytes = encodeFrame(frame);
  } catch (err) {
    bytes = encodeFrame({ id: frame.id, kind: "error", code: "too_large", message: (err as Error).message });
  }
  writeChain = writeChain.then(() => writeAll(bytes));
}

const guestctl = new GuestCtl("/opt/forkd/bin/forkd-guestctl");
guestctl.start();
const server = new AgentServer(send, {
  identity: { guestctl, hostnameFile: "/proc/sys/kernel/hostname" },
  hostname: () => os.hostname(),
});

let decoder = new FrameDecoder();
let connected = false;
let idleDelayMs = IDLE_POLL_MIN_MS;
const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);

function readLoop(): void {
  fs.read(fd, readBuffer, 0, readBuffer.length, null, (err, bytesRead) => {
    if (err || bytesRead === 0) {
      if (connected) {
        // The host hung up: nobody will read the answers of what it started.
        connected = false;
        server.abortAll();
        decoder = new FrameDecoder();
      }
      setTimeout(readLoop, idleDelayMs);
      idleDelayMs = Math.min(idleDelayMs * 2, IDLE_POLL_MAX_MS);
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

readLoop();
