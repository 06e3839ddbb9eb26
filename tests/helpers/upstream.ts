// An "outside" host for network tests, built on this machine: a network namespace
// joined to the host by a veth pair, an address of the test's choosing, and an
// HTTP server in it. Nothing a test sends through it leaves the machine.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";

export type Upstream = { netns: string; addr: string; hostAddr: string; port: number; stop: () => void };

function ip(args: string[]): void {
  const res = spawnSync("ip", args, { encoding: "utf8" });
  if (res.status !== 0) throw new Error(`ip ${args.join(" ")}: ${res.stderr}`);
}

/** `hostAddr` and `addr` are the two usable addresses of one /30 (the host's end and the upstream's). */
export async function startUpstream(opts: { hostAddr: string; addr: string; body: string; port?: number }): Promise<Upstream> {
  const tag = randomBytes(3).toString("hex");
  const netns = `fkt-up-${tag}`;
  const hostVeth = `fktu${tag}h`;
  const port = opts.port ?? 8080;
  let server: ChildProcess | undefined;
  const stop = () => {
    if (server?.pid && server.exitCode === null) server.kill("SIGKILL");
    spawnSync("ip", ["netns", "delete", netns]);
    spawnSync("ip", ["link", "delete", hostVeth], { stdio: "ignore" });
  };
  try {
    ip(["netns", "add", netns]);
    ip(["link", "add", hostVeth, "type", "veth", "peer", "name", "eth0", "netns", netns]);
    ip(["addr", "add", `${opts.hostAddr}/30`, "dev", hostVeth]);
    ip(["link", "set", hostVeth, "up"]);
    ip(["-n", netns, "addr", "add", `${opts.addr}/30`, "dev", "eth0"]);
    ip(["-n", netns, "link", "set", "eth0", "up"]);
    const code = `require("http").createServer((q, r) => r.end(${JSON.stringify(opts.body)})).listen(${port}, "0.0.0.0")`;
    server = spawn("ip", ["netns", "exec", netns, process.execPath, "-e", code], { stdio: "ignore" });
    const deadline = Date.now() + 10_000;
    for (;;) {
      const ok = await fetch(`http://${opts.addr}:${port}/`, { signal: AbortSignal.timeout(1000) })
        .then(async (r) => (await r.text()) === opts.body)
        .catch(() => false);
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`upstream ${opts.addr}:${port} did not answer`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } catch (err) {
    stop();
    throw err;
  }
  return { netns, addr: opts.addr, hostAddr: opts.hostAddr, port, stop };
}

/**
 * HTTP GETs from inside a guest with its own node, all at once, 3 s timeout each:
 * one line per target, "HOST:PORT BODY:…" when it got through, "HOST:PORT ERR:…" when not.
 */
export function guestGetScript(targets: [host: string, port: number][]): string[] {
  const code = [
    `for (const [host, port] of ${JSON.stringify(targets)}) {`,
    "  let done = false;",
    '  const say = (what) => { if (!done) { done = true; console.log(host + ":" + port + " " + what); } };',
    '  const r = require("http").get({ host, port, timeout: 3000 }, (s) => {',
    '    let b = ""; s.on("data", (d) => (b += d)); s.on("end", () => say("BODY:" + b));',
    "  });",
    '  r.on("timeout", () => { say("ERR:timeout"); r.destroy(); });',
    '  r.on("error", (e) => say("ERR:" + e.code));',
    "}",
  ].join("\n");
  return ["/opt/forkd/bin/node", "-e", code];
}
