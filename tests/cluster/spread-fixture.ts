// What the spread tests run against: a real etcd and a real docker-registry on
// loopback (each in a temp dir of its own, never the packaged services), and forkd
// daemons as separate processes on 127.0.0.x, each with its own home, run dir and
// staging dir (guest images are shared, linked in), joined to one cluster.
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { CLI } from "../helpers/env.js";
import { startEtcd as startEtcdMembers } from "./helpers.js";

const ROOT = process.env.FORKD_TEST_ROOT ?? "/tmp";

async function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function waitFor(what: string, check: () => Promise<boolean>, child: ChildProcess, log: () => string, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check().catch(() => false)) return;
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  child.kill("SIGKILL");
  throw new Error(`${what} did not start: ${log().slice(-3000)}`);
}

function captureLog(child: ChildProcess): () => string {
  let log = "";
  child.stderr?.setEncoding("utf8").on("data", (d: string) => (log = (log + d).slice(-50_000)));
  return () => log;
}

export type Service = { url: string; stop: () => Promise<void> };

async function stopChild(child: ChildProcess, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  child.kill(signal);
  await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
  if (child.exitCode === null && child.signalCode === null) {
    child.kill("SIGKILL");
    await exited;
  }
}

/** One etcd member on loopback (the cluster tests' own starter), data in a temp dir. */
export async function startEtcd(): Promise<Service> {
  const dir = fs.mkdtempSync(path.join(ROOT, "etcd-"));
  const etcd = await startEtcdMembers(dir, 1);
  return {
    url: etcd.url,
    stop: async () => {
      await etcd.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Debian's docker-registry on loopback without auth, storage in a temp dir; `url` is oci://HOST:PORT/REPO. */
export async function startRegistry(repo = "forkd/cluster"): Promise<Service & { port: number }> {
  const dir = fs.mkdtempSync(path.join(ROOT, "registry-"));
  const port = await freePort();
  fs.writeFileSync(
    path.join(dir, "config.yml"),
    [
      "version: 0.1",
      "log:",
      "  level: warn",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${path.join(dir, "data")}`,
      "  delete:",
      "    enabled: true",
      "http:",
      `  addr: 127.0.0.1:${port}`,
      `  secret: ${randomBytes(16).toString("hex")}`,
      "",
    ].join("\n"),
  );
  const child = spawn("/usr/bin/docker-registry", ["serve", path.join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  const log = captureLog(child);
  await waitFor("docker-registry", async () => (await fetch(`http://127.0.0.1:${port}/v2/`)).status === 200, child, log);
  return {
    url: `oci://127.0.0.1:${port}/${repo}`,
    port,
    stop: async () => {
      await stopChild(child);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export type ClusterDaemon = {
  name: string;
  url: string;
  token: string;
  home: string;
  child: ChildProcess;
  stderr: () => string;
  /** A JSON call to this node's API with the client token. */
  call: <T = unknown>(method: string, urlPath: string, body?: unknown) => Promise<{ status: number; body: T }>;
  stop: (signal?: NodeJS.Signals) => Promise<void>;
};

/** A daemon joined to the cluster at `etcd`, listening on 127.0.0.`index + 1`. */
export async function startClusterDaemon(opts: {
  name: string;
  index: number;
  etcd: string;
  registry: string;
  clusterTokenFile: string;
  args?: string[];
  env?: Record<string, string>;
}): Promise<ClusterDaemon> {
  const host = `127.0.0.${opts.index + 1}`;
  const port = await freePort(host);
  const root = fs.mkdtempSync(path.join(ROOT, `node-${opts.name}-`));
  const home = path.join(root, "home");
  const runDir = path.join(root, "run");
  const shmDir = fs.mkdtempSync(path.join("/dev/shm", `forkd-node-${opts.name}-`));
  fs.mkdirSync(home, { mode: 0o700 });
  fs.mkdirSync(runDir, { mode: 0o700 });
  const images = path.join(process.env.FORKD_HOME ?? "/var/lib/forkd", "images");
  if (fs.existsSync(images)) fs.symlinkSync(images, path.join(home, "images"));
  const token = randomBytes(24).toString("base64url");
  const tokenFile = path.join(root, "token");
  fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const url = `http://${host}:${port}`;
  const child = spawn(
    process.execPath,
    [
      CLI,
      "daemon",
      "--listen",
      `${host}:${port}`,
      "--socket",
      path.join(root, "forkd.sock"),
      "--token-file",
      tokenFile,
      "--audit-log",
      path.join(root, "audit.log"),
      "--cluster",
      opts.etcd,
      "--node-name",
      opts.name,
      "--advertise-url",
      url,
      "--cluster-token-file",
      opts.clusterTokenFile,
      "--registry",
      opts.registry,
      ...(opts.args ?? []),
    ],
    {
      env: { ...process.env, FORKD_HOME: home, FORKD_RUN_DIR: runDir, FORKD_SHM_DIR: shmDir, ...opts.env },
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  const stderr = captureLog(child);
  const call = async <T>(method: string, urlPath: string, body?: unknown) => {
    const res = await fetch(`${url}${urlPath}`, {
      method,
      headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      signal: AbortSignal.timeout(600_000),
    });
    const text = await res.text();
    return { status: res.status, body: (text ? JSON.parse(text) : undefined) as T };
  };
  await waitFor(`daemon ${opts.name}`, async () => (await call("GET", "/v1/cluster/nodes")).status === 200, child, stderr, 180_000);
  return {
    name: opts.name,
    url,
    token,
    home,
    child,
    stderr,
    call,
    stop: async (signal = "SIGTERM") => {
      await stopChild(child, signal);
      fs.rmSync(root, { recursive: true, force: true });
      fs.rmSync(shmDir, { recursive: true, force: true });
    },
  };
}

/** A cluster token file every node of a test cluster reads. */
export function clusterTokenFile(): string {
  const file = path.join(fs.mkdtempSync(path.join(ROOT, "cluster-token-")), "token");
  fs.writeFileSync(file, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  return file;
}
