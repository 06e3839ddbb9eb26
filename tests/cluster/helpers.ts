// A real etcd (Debian's etcd-server, 1 or 3 members on loopback) and forkd daemons
// as separate processes, each with its own FORKD_HOME, run dir and shared-memory dir:
// a cluster on one machine, as the cluster tests need it.
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { CLI } from "../helpers/env.js";

/** The lease TTL the tests run with: short, so a lapse is seen in seconds, not so short that a loaded host loses it. */
export const TEST_LEASE_TTL_S = 4;

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

export async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ""}`);
}

type Member = { name: string; client: number; peer: number; dataDir: string; child?: ChildProcess; log: string };

export type EtcdHandle = {
  /** etcd://127.0.0.1:P[,…], as forkd daemon --cluster takes it. */
  url: string;
  members: Member[];
  stop: (index?: number) => Promise<void>;
  start: (index?: number) => Promise<void>;
};

/** `n` etcd members on loopback (data under `root`), started and answering. */
export async function startEtcd(root: string, n = 1): Promise<EtcdHandle> {
  const members: Member[] = [];
  for (let i = 0; i < n; i++) {
    members.push({ name: `m${i}`, client: await freePort(), peer: await freePort(), dataDir: path.join(root, `etcd-m${i}`), log: "" });
  }
  const initialCluster = members.map((m) => `${m.name}=http://127.0.0.1:${m.peer}`).join(",");
  const startOne = (m: Member) => {
    m.child = spawn(
      "etcd",
      [
        "--name",
        m.name,
        "--data-dir",
        m.dataDir,
        "--listen-client-urls",
        `http://127.0.0.1:${m.client}`,
        "--advertise-client-urls",
        `http://127.0.0.1:${m.client}`,
        "--listen-peer-urls",
        `http://127.0.0.1:${m.peer}`,
        "--initial-advertise-peer-urls",
        `http://127.0.0.1:${m.peer}`,
        "--initial-cluster",
        initialCluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        `forkd-test-${path.basename(root)}`,
      ],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    m.child.stderr!.setEncoding("utf8").on("data", (d: string) => {
      m.log = (m.log + d).slice(-20_000);
    });
  };
  const healthy = (m: Member) =>
    waitFor(`etcd ${m.name} healthy`, async () => {
      const res = await fetch(`http://127.0.0.1:${m.client}/health`, { signal: AbortSignal.timeout(2000) });
      const body = (await res.json()) as { health?: string };
      return body.health === "true" ? true : undefined;
    });
  for (const m of members) startOne(m);
  await Promise.all(members.map(healthy));
  const stop = async (index?: number) => {
    await Promise.all(
      members
        .filter((_, i) => index === undefined || i === index)
        .map(async (m) => {
          const child = m.child;
          if (!child || child.exitCode !== null) return;
          const exited = new Promise((r) => child.once("exit", r));
          child.kill("SIGTERM");
          await exited;
        }),
    );
  };
  const start = async (index?: number) => {
    const chosen = members.filter((_, i) => index === undefined || i === index);
    for (const m of chosen) startOne(m);
    // One member of three alone has no quorum: it answers /health once the others are back.
    if (index === undefined) await Promise.all(chosen.map(healthy));
  };
  return { url: `etcd://${members.map((m) => `127.0.0.1:${m.client}`).join(",")}`, members, stop, start };
}

export type NodeHandle = {
  name: string;
  dir: string;
  url: string;
  token: string;
  env: NodeJS.ProcessEnv;
  audit: string;
  child: ChildProcess;
  stderr: () => string;
  /** Start the daemon again on the same home, port and name (after a kill). */
  restart: () => Promise<void>;
};

/** One cluster member: `forkd daemon --cluster …` with its own home, run dir and shm dir, on a port it keeps. */
export async function startNode(opts: { root: string; name: string; etcd: string; clusterTokenFile: string }): Promise<NodeHandle> {
  // Directly under the run's root: its teardown removes the egress namespace each node's run dir records.
  const dir = path.join(opts.root, `cluster-${process.pid}-${opts.name}`);
  const home = path.join(dir, "home");
  const runDir = path.join(dir, "run");
  fs.mkdirSync(home, { recursive: true });
  fs.mkdirSync(runDir, { recursive: true });
  const realHome = process.env.FORKD_REAL_HOME ?? "/var/lib/forkd";
  if (!fs.existsSync(path.join(home, "images")) && fs.existsSync(path.join(realHome, "images"))) {
    fs.symlinkSync(path.join(realHome, "images"), path.join(home, "images"));
  }
  const tokenFile = path.join(dir, "token.txt");
  if (!fs.existsSync(tokenFile)) fs.writeFileSync(tokenFile, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  const port = await freePort();
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    FORKD_HOME: home,
    FORKD_RUN_DIR: runDir,
    FORKD_SHM_DIR: path.join("/dev/shm", `forkd-cluster-test-${process.pid}-${opts.name}`),
    FORKD_CLUSTER_LEASE_TTL: String(TEST_LEASE_TTL_S),
    FORKD_SOCKET: path.join(dir, "forkd.sock"),
  };
  const handle = {
    name: opts.name,
    dir,
    url: `http://127.0.0.1:${port}`,
    token: fs.readFileSync(tokenFile, "utf8").trim(),
    env,
    audit: path.join(dir, "audit.log"),
  } as NodeHandle;
  let stderr = "";
  const launch = async () => {
    stderr = "";
    const child = spawn(
      process.execPath,
      [
        CLI,
        "daemon",
        "--listen",
        `127.0.0.1:${port}`,
        "--socket",
        path.join(dir, "forkd.sock"),
        "--token-file",
        tokenFile,
        "--audit-log",
        handle.audit,
        "--cluster",
        opts.etcd,
        "--node-name",
        opts.name,
        "--cluster-token-file",
        opts.clusterTokenFile,
      ],
      { env, stdio: ["ignore", "ignore", "pipe"] },
    );
    child.stderr!.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
    });
    handle.child = child;
    const exited = await waitFor(
      `node ${opts.name} serving`,
      async () => (child.exitCode !== null ? "exited" : /forkd daemon [^:]+: unix /.test(stderr) ? "serving" : undefined),
      120_000,
    );
    if (exited === "exited") throw new Error(`daemon ${opts.name} exited: ${stderr}`);
  };
  handle.stderr = () => stderr;
  handle.restart = launch;
  await launch();
  return handle;
}

export async function killNode(node: NodeHandle, signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
  if (node.child.exitCode !== null || node.child.signalCode !== null) return;
  const exited = new Promise((r) => node.child.once("exit", r));
  node.child.kill(signal);
  await exited;
}

export function clusterTokenFile(root: string): string {
  const file = path.join(root, "cluster-token");
  fs.writeFileSync(file, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  return file;
}
