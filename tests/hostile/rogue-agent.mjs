// Runs inside a guest (under /opt/forkd/bin/node): kills the forkd agent, takes
// its virtio-serial port and speaks to the host as a hostile agent would.
//
//   node rogue-agent.mjs MODE DELAY_MS [BASE64_BYTES]
//
// raw         write the given bytes once, then read and discard whatever comes
// raw-loop    write the given bytes every 200 ms (blocks while no host is attached)
// flood       write chunk frames for an id the host never used, as fast as it takes them
// wrong-id    answer cancels and the first ping properly, then every later ping with the first one's id
// silent      read every request, answer none
import fs from "node:fs";

const [mode, delayArg, payloadArg] = process.argv.slice(2);
const payload = Buffer.from(payloadArg ?? "", "base64");
const PORTS = "/sys/class/virtio-ports";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function frame(message) {
  const body = Buffer.from(JSON.stringify(message));
  const header = Buffer.alloc(4);
  header.writeUInt32BE(body.length);
  return Buffer.concat([header, body]);
}

function agentPids() {
  const pids = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").includes("/opt/forkd/agent.js")) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

function portPath() {
  for (const entry of fs.readdirSync(PORTS)) {
    if (fs.readFileSync(`${PORTS}/${entry}/name`, "utf8").trim() === "forkd.agent") return `/dev/${entry}`;
  }
  throw new Error("no forkd.agent port");
}

function writeAll(fd, bytes) {
  let offset = 0;
  while (offset < bytes.length) offset += fs.writeSync(fd, bytes, offset, bytes.length - offset);
}

/** Requests from the host, decoded; `onRequest` sees each. Reads never stop, so the host's writes never back up. */
function readRequests(fd, onRequest) {
  const buffer = Buffer.alloc(256 * 1024);
  let pending = Buffer.alloc(0);
  const loop = () => {
    fs.read(fd, buffer, 0, buffer.length, null, (err, n) => {
      if (err || n === 0) {
        setTimeout(loop, 50);
        return;
      }
      pending = Buffer.concat([pending, buffer.subarray(0, n)]);
      while (pending.length >= 4 && pending.length >= 4 + pending.readUInt32BE(0)) {
        const length = pending.readUInt32BE(0);
        const body = pending.subarray(4, 4 + length);
        pending = pending.subarray(4 + length);
        try {
          onRequest(JSON.parse(body.toString("utf8")));
        } catch {
          // not ours to judge
        }
      }
      loop();
    });
  };
  loop();
}

await sleep(Number(delayArg ?? 300));
for (const pid of agentPids()) {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}
let fd;
for (let attempt = 0; fd === undefined; attempt++) {
  try {
    fd = fs.openSync(portPath(), "r+");
  } catch (err) {
    // The port stays busy until the killed agent's file is released.
    if (attempt > 400) throw err;
    await sleep(25);
  }
}

switch (mode) {
  case "raw":
    writeAll(fd, payload);
    readRequests(fd, () => {});
    break;
  case "raw-loop":
    setInterval(() => writeAll(fd, payload), 200);
    break;
  case "flood": {
    const chunk = frame({ id: 2 ** 40 + 7, kind: "chunk", stream: "stdout", data: Buffer.alloc(48 * 1024, 0x41).toString("base64") });
    readRequests(fd, () => {});
    for (let i = 0; i < 20_000; i++) writeAll(fd, chunk);
    break;
  }
  case "wrong-id": {
    let first;
    const pong = { version: "0.1.0", uptimeMs: 1, hostname: "rogue", runtimes: [] };
    readRequests(fd, (request) => {
      if (request.op === "cancel") {
        writeAll(fd, frame({ id: request.id, kind: "result", value: { cancelled: false } }));
      } else if (request.op === "ping" && first === undefined) {
        first = request.id;
        writeAll(fd, frame({ id: first, kind: "result", value: pong }));
      } else if (request.op === "ping") {
        writeAll(fd, frame({ id: first, kind: "result", value: pong }));
      }
    });
    break;
  }
  case "silent":
    readRequests(fd, () => {});
    break;
  default:
    throw new Error(`unknown mode ${mode}`);
}
setInterval(() => {}, 60_000);
