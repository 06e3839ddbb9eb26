// The network egress policy against real VMs, real namespaces and real nftables:
// the default reaches a public-looking upstream (in a namespace of this test's own)
// and never the host; deny_out and allow_out change that per sandbox; network:false
// reaches nothing. Every address used here is on this machine.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { egressNamespaceInfo, listSandboxes, runDirUid } from "@forkd/core";
import { ALL_TRAFFIC, Controller, Sandbox } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";
import { guestGetScript, startUpstream, type Upstream } from "../helpers/upstream.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "egress-warm";

let daemon: DaemonHandle;
let api: Controller;
let pub: Upstream;
let priv: Upstream;
let hostServer: http.Server;
let hostPort: number;

function forkd(args: string[], extraEnv: Record<string, string> = {}) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 300_000, env: { ...process.env, ...extraEnv } });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

async function fork(body: Record<string, unknown> = {}): Promise<string> {
  const res = await api.createSandboxes({ snapshot_tag: TAG, n: 1, ...body });
  expect(res).toHaveLength(1);
  return res[0]!.id;
}

/** GET http://host:port/ from inside the sandbox: "BODY:…" when it got through. */
async function get(id: string, host: string, port: number): Promise<string> {
  return (await getAll(id, [[host, port]]))[0]!;
}

/** Several GETs at once (blocked ones each wait out the timeout): one answer per target, in order. */
async function getAll(id: string, targets: [string, number][]): Promise<string[]> {
  const res = await api.exec(id, { argv: guestGetScript(targets), timeout_ms: 60_000 });
  const lines = res.stdout.trim().split("\n");
  return targets.map(([host, port]) => lines.find((l) => l.startsWith(`${host}:${port} `)) ?? `${host}:${port} no answer: ${res.stderr}`);
}

function nsRuleset(): string {
  const ns = egressNamespaceInfo();
  return ns ? spawnSync("ip", ["netns", "exec", ns.netns, "nft", "list", "ruleset"], { encoding: "utf8" }).stdout : "";
}

/** The host's own IPv4 addresses but loopback (the upstreams' host ends among them). */
function hostAddresses(): string[] {
  return Object.values(os.networkInterfaces())
    .flat()
    .filter((a): a is os.NetworkInterfaceInfo => !!a && a.family === "IPv4" && !a.internal)
    .map((a) => a.address);
}

/**
 * The host-wide switch, off for this file whatever the host had: forkd turns
 * forwarding on only on the interfaces its namespace's traffic passes, so every
 * test below runs with net.ipv4.ip_forward=0 and must still get out (and be
 * stopped where its policy says).
 */
const IP_FORWARD = "/proc/sys/net/ipv4/ip_forward";
const ipForwardBefore = fs.readFileSync(IP_FORWARD, "utf8").trim();

beforeAll(async () => {
  fs.writeFileSync(IP_FORWARD, "0");
  pub = await startUpstream({ hostAddr: "203.0.113.9", addr: "203.0.113.10", body: "upstream-public" });
  priv = await startUpstream({ hostAddr: "10.213.77.1", addr: "10.213.77.2", body: "upstream-private" });
  // A service on the host's loopback (and every other host address): what a guest must never reach.
  hostServer = http.createServer((_q, r) => r.end("from-host"));
  await new Promise<void>((r) => hostServer.listen(0, "0.0.0.0", () => r()));
  hostPort = (hostServer.address() as { port: number }).port;
  expect(await (await fetch(`http://127.0.0.1:${hostPort}/`)).text()).toBe("from-host");
  const snap = forkd(["snapshot", "--tag", TAG]);
  expect(snap.code, snap.stderr).toBe(0);
  daemon = await startDaemonProcess(env.runDir);
  api = new Controller({ url: daemon.url, token: daemon.token });
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  forkd(["kill", "--all"]);
  forkd(["cleanup", "-y"]);
  hostServer?.close();
  pub?.stop();
  priv?.stop();
  fs.writeFileSync(IP_FORWARD, ipForwardBefore);
});

describe("default policy", () => {
  it("reaches a public upstream, not a private one, and the sandbox view says so", async () => {
    const id = await fork();
    expect(await get(id, pub.addr, pub.port)).toContain("BODY:upstream-public");
    // Without the host-wide switch: forwarding is on only where the namespace's traffic passes.
    expect(fs.readFileSync(IP_FORWARD, "utf8").trim()).toBe("0");
    const ns = egressNamespaceInfo();
    expect(fs.readFileSync(`/proc/sys/net/ipv4/conf/${ns!.hostVeth}/forwarding`, "utf8").trim()).toBe("1");
    expect(await get(id, priv.addr, priv.port)).toMatch(/ ERR:/);
    const view = await api.getSandbox(id);
    expect(view.network).toBe("user");
    expect(view.network_policy).toEqual({ mode: "public", allow_out: [], deny_out: [] });
    await api.deleteSandbox(id);
  });

  it("never reaches the host: not its loopback through 10.0.2.2, not its own addresses, not the daemon's port", async () => {
    const id = await fork();
    const daemonPort = Number(new URL(daemon.url).port);
    const addresses = hostAddresses();
    expect(addresses).toEqual(expect.arrayContaining([pub.hostAddr, priv.hostAddr]));
    // The host itself answers on each of these (so a block below is the policy's doing).
    for (const addr of addresses) expect(await (await fetch(`http://${addr}:${hostPort}/`)).text()).toBe("from-host");
    const answers = await getAll(id, [
      ["10.0.2.2", hostPort],
      ["10.0.2.2", daemonPort],
      ...addresses.map((a): [string, number] => [a, hostPort]),
      ...addresses.map((a): [string, number] => [a, daemonPort]),
    ]);
    expect(answers).toHaveLength(2 + 2 * addresses.length);
    for (const answer of answers) expect(answer).toMatch(/ ERR:/);
    // The upstream behind the same veth still answers: only the host is out of reach.
    expect(await get(id, pub.addr, pub.port)).toContain("BODY:upstream-public");
    await api.deleteSandbox(id);
  });
});

describe("per-sandbox lists", () => {
  it("deny_out blocks an otherwise allowed destination; allow_out wins where both match", async () => {
    const denied = await fork({ deny_out: ["203.0.113.0/24"] });
    // Through the SDK's E2B-shaped options: an allow-list.
    const narrowed = (
      await Sandbox.create({
        template: TAG,
        controller: api,
        network: { denyOut: [ALL_TRAFFIC], allowOut: [`${pub.addr}:${pub.port}`] },
      })
    ).sandboxId;
    const [a, b] = await Promise.all([get(denied, pub.addr, pub.port), get(narrowed, pub.addr, pub.port)]);
    expect(a).toMatch(/ ERR:/);
    expect(b).toContain("BODY:upstream-public");
    expect((await api.getSandbox(narrowed)).network_policy).toEqual({
      mode: "public",
      allow_out: ["203.0.113.10:8080"],
      deny_out: ["0.0.0.0/0"],
    });
    // The rules live under the VMM's uid and leave with the sandbox.
    const uid = runDirUid(listSandboxes().find((s) => s.id === denied)!.run_dir)!;
    expect(nsRuleset()).toContain(`sb_${uid}`);
    await api.deleteSandbox(denied);
    expect(nsRuleset()).not.toContain(`sb_${uid}`);
    await api.deleteSandbox(narrowed);
  });

  it("allow_out of a private CIDR makes a private upstream reachable, but never the host's own address in it", async () => {
    const id = await fork({ allow_out: ["10.213.77.0/30"] });
    expect(await get(id, priv.addr, priv.port)).toContain("BODY:upstream-private");
    expect(await get(id, priv.hostAddr, hostPort)).toMatch(/ ERR:/);
    await api.deleteSandbox(id);
  });

  it("network: false reaches nothing", async () => {
    const id = await fork({ network: false, allow_out: ["10.213.77.0/30"] });
    expect(await get(id, pub.addr, pub.port)).toMatch(/ ERR:/);
    expect(await get(id, priv.addr, priv.port)).toMatch(/ ERR:/);
    expect(await get(id, "10.0.2.2", hostPort)).toMatch(/ ERR:/);
    expect((await api.getSandbox(id)).network_policy).toEqual({ mode: "none", allow_out: [], deny_out: [] });
    const uid = runDirUid(listSandboxes().find((s) => s.id === id)!.run_dir)!;
    expect(nsRuleset()).toMatch(new RegExp(`chain sb_${uid} \\{\\s+drop\\s+\\}`));
    await api.deleteSandbox(id);
    expect(nsRuleset()).not.toContain(`sb_${uid}`);
  });

  it("a bad entry is a 400 naming it, over REST and in the CLI", async () => {
    for (const [field, entry, why] of [
      ["allow_out", "example.com", /host names are not accepted/],
      ["allow_out", "10.0.0.0/33", /prefix length/],
      ["deny_out", "1.2.3.4:99999", /port/],
    ] as const) {
      const res = await fetch(`${daemon.url}/v1/sandboxes`, {
        method: "POST",
        headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
        body: JSON.stringify({ snapshot_tag: TAG, [field]: [entry] }),
      });
      expect(res.status).toBe(400);
      const body = (await res.json()) as { error: string; code: string };
      expect(body.code).toBe("bad_request");
      expect(body.error).toContain(`${field} entry '${entry}'`);
      expect(body.error).toMatch(why);
    }
    const cli = forkd(["fork", "--tag", TAG, "--allow-out", "10.0.0.0/8", "--allow-out", "db.internal:5432"], {
      FORKD_TOKEN: daemon.token,
    });
    expect(cli.code).not.toBe(0);
    expect(cli.stderr).toContain("allow_out entry 'db.internal:5432'");
  });
});

describe("turned off, and cleaned up", () => {
  it("with the policy off a guest reaches the host's loopback, which is why it is on; doctor fails then", async () => {
    // Direct (not through the daemon, whose policy is on): FORKD_SOCKET names no socket.
    const direct = { FORKD_NETWORK_POLICY: "off", FORKD_SOCKET: path.join(env.runDir, "no-daemon.sock") };
    const off = forkd(["fork", "--tag", TAG, "--json"], direct);
    expect(off.code, off.stderr).toBe(0);
    const [child] = JSON.parse(off.stdout) as { id: string }[];
    expect(await get(child!.id, "10.0.2.2", hostPort)).toContain("BODY:from-host");
    expect((await api.getSandbox(child!.id)).network_policy).toEqual({ mode: "unfiltered", allow_out: [], deny_out: [] });
    await api.deleteSandbox(child!.id);
    const checks = (env: Record<string, string>) =>
      (JSON.parse(forkd(["doctor", "--json"], env).stdout) as { name: string; status: string; detail: string }[]).find(
        (c) => c.name === "egress policy",
      );
    expect(checks({ FORKD_NETWORK_POLICY: "off" })).toMatchObject({ status: "fail", detail: expect.stringMatching(/off/) });
    expect(checks({})?.status).toMatch(/pass|warn/);
    expect(forkd(["fork", "--tag", TAG, "--deny-out", "1.1.1.1"], direct).stderr).toMatch(/need the network egress policy, which is off/);
  });

  it("a host without nft: the daemon refuses to start and names the fix, unless told --network-policy off", async () => {
    // A forkd instance of its own (no namespace yet) whose PATH has neither nft nor ip.
    const dir = fs.mkdtempSync(path.join(env.runDir, "no-nft-"));
    const bare = { ...process.env, PATH: dir, FORKD_HOME: path.join(dir, "home"), FORKD_RUN_DIR: path.join(dir, "run") };
    const args = [CLI, "daemon", "--listen", "none", "--socket", path.join(dir, "d.sock")];
    const refused = spawnSync(process.execPath, args, { env: bare, encoding: "utf8", timeout: 60_000 });
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toContain("the nft program is not installed (fix: apt-get install nftables)");
    expect(refused.stderr).toContain("--network-policy off");
    const off = spawn(process.execPath, [...args, "--network-policy", "off"], { env: bare, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    off.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const deadline = Date.now() + 60_000;
    while (!/unix .*d\.sock/.test(stderr) && off.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    off.kill("SIGTERM");
    expect(stderr).toContain("the network egress policy is OFF");
    expect(stderr).toMatch(/unix .*d\.sock/);
    const doctor = spawnSync(process.execPath, [CLI, "doctor", "--json"], { env: bare, encoding: "utf8", timeout: 120_000 });
    const check = (JSON.parse(doctor.stdout) as { name: string; status: string; detail: string }[]).find((c) => c.name === "egress policy");
    expect(check).toMatchObject({ status: "fail", detail: expect.stringMatching(/off/) });
  });

  it("cleanup removes the namespace, its veth and the host table once no VM uses them", async () => {
    const ns = egressNamespaceInfo()!;
    expect(fs.existsSync(ns.path)).toBe(true);
    await stopDaemon(daemon);
    expect(forkd(["kill", "--all"]).code).toBe(0);
    const report = JSON.parse(forkd(["cleanup", "-y", "--json"]).stdout);
    expect(report.egressNamespaceRemoved).toBe(true);
    expect(fs.existsSync(ns.path)).toBe(false);
    expect(fs.existsSync(`/sys/class/net/${ns.hostVeth}`)).toBe(false);
    expect(spawnSync("nft", ["list", "tables"], { encoding: "utf8" }).stdout).not.toContain(ns.hostTable);
    expect(egressNamespaceInfo()).toBeUndefined();
  });
});
