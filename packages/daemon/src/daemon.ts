import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { clusterConfig, readClusterToken } from "@forkd/cluster";
import {
  AdmissionLedger,
  admissionLimits,
  cleanup,
  configureSettings,
  defaultSocketPath,
  egressPolicyEnabled,
  ensureEgressNamespace,
  ensureRuntimeDir,
  ensureStateDir,
  expireSandboxes,
  ForkdError,
  forkdHome,
  forkdRunDir,
  listSandboxes,
  markEgressPolicy,
  setting,
  settings,
} from "@forkd/core";
import { E2bContext, startE2bTimeLimits } from "@forkd/e2b";
import type { FastifyInstance } from "fastify";
import { AgentConnections } from "./agent-connections.js";
import { AuditLog } from "./audit.js";
import { ensureLocalToken, isLoopback, readTokenFile } from "./auth.js";
import { startCluster } from "./cluster.js";
import { EventHub, StateWatcher } from "./events.js";
import { HotPools } from "./hot-pools.js";
import { JobRegistry } from "./jobs.js";
import { createMetrics } from "./metrics.js";
import { sampleState } from "./routes/events.js";
import { daemonForkSteps } from "./routes/fork-steps.js";
import { buildServer, FORKD_VERSION, type ServerContext } from "./server.js";
import { LatencyWindow, metricsSummary } from "./usage.js";

export type DaemonOpts = {
  socket?: string;
  /** HOST:PORT, or "none" for the unix socket only. */
  listen?: string;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  /** Serve plain HTTP off loopback (a TLS-terminating proxy in front); refused otherwise. */
  insecureListen?: boolean;
  auditLog?: string;
  maxSandboxes?: number;
  maxBranches?: number;
  /** "off" runs sandboxes without the egress policy (as FORKD_NETWORK_POLICY=off would); doctor then fails. */
  networkPolicy?: "on" | "off";
  log?: (line: string) => void;
  /** etcd://HOST:PORT[,…]: join this cluster (FORKD_CLUSTER when unset). */
  cluster?: string;
  /** This node's name in the cluster (FORKD_NODE_NAME, else the host name). */
  nodeName?: string;
  /** Where the other nodes reach this daemon (FORKD_ADVERTISE_URL, else the --listen address). */
  advertiseUrl?: string;
  /** The cluster secret's file (else FORKD_CLUSTER_TOKEN). */
  clusterTokenFile?: string;
  /** oci://HOST/REPO the nodes move snapshots through (FORKD_CLUSTER_REGISTRY). */
  registry?: string;
};

export type RunningDaemon = { socket: string; tcp?: { host: string; port: number }; close: () => Promise<void> };
/** The socket the daemon listens on without --socket (core's, re-exported for the daemon's callers). */

function defaultTokenFile(): string {
  return path.join(forkdHome(), "token");
}

export function parseListen(value: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$/.exec(value);
  const port = Number(m?.[2]);
  if (!m || port < 0 || port > 65535)
    throw new ForkdError("bad_request", `--listen wants HOST:PORT such as 127.0.0.1:8889, got '${value}'`);
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port };
}

async function socketInUse(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createConnection({ path: socketPath });
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
}

/**
 * What the servers share: built before any VM is touched (no cleanup, no egress
 * namespace), so a server can be made from it over an empty FORKD_HOME — the HTTP
 * contract tests do, with fastify's inject().
 */
export function createServerContext(opts: {
  token: string;
  /** The audit log's file (0600, appended to); undefined keeps no log. */
  auditLog: string | undefined;
  log: (line: string) => void;
  maxSandboxes?: number | undefined;
  maxBranches?: number | undefined;
}): ServerContext {
  const { token, log } = opts;
  const audit = new AuditLog(opts.auditLog);
  const metrics = createMetrics(FORKD_VERSION);
  const events = new EventHub();
  const agents = new AgentConnections((id, reason) => {
    audit.write({ ts: new Date().toISOString(), event: "sandbox_unhealthy", sandboxes: [id], reason });
    events.publish({ type: "sandbox.unhealthy", data: { id, reason } });
    log(`forkd daemon: sandbox ${id} is unhealthy: ${reason}`);
  });
  const admission = new AdmissionLedger(admissionLimits({ maxSandboxes: opts.maxSandboxes ?? 1000, maxBranches: opts.maxBranches ?? 4 }));
  const jobs = new JobRegistry();
  const spawns = new LatencyWindow();
  const poolClaims = new LatencyWindow();
  const hotPools = new HotPools({ agents, admission, metrics, poolClaims, log });
  // Polled only while a client listens; metrics every 2 s.
  const watcher = new StateWatcher(
    events,
    () => sampleState(hotPools, jobs),
    async () => metricsSummary({ spawns, poolClaims }, admission),
    { intervalMs: 500, metricsEvery: 4, log },
  );
  const ctx: ServerContext = {
    token,
    log,
    audit,
    metrics,
    agents,
    admission,
    jobs,
    hotPools,
    events,
    watcher,
    spawns,
    poolClaims,
    e2b: new E2bContext({ home: forkdHome(), agents, admission, forkSteps: (onEachChild) => daemonForkSteps(ctx, onEachChild), log }),
  };
  return ctx;
}

export async function startDaemon(opts: DaemonOpts = {}): Promise<RunningDaemon> {
  // Every setting checked before anything starts: a bad variable stops the daemon here, naming it.
  settings();
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const tcp = opts.listen === "none" ? undefined : parseListen(opts.listen ?? "127.0.0.1:8889");
  if (tcp && !isLoopback(tcp.host) && !opts.tokenFile) {
    throw new ForkdError("bad_request", `refusing to listen on ${tcp.host} (not loopback) without --token-file`);
  }
  if (Boolean(opts.tlsCert) !== Boolean(opts.tlsKey)) throw new ForkdError("bad_request", "--tls-cert and --tls-key go together");
  // Off loopback the bearer token and every command would cross the network in the clear.
  if (tcp && !isLoopback(tcp.host) && !opts.tlsCert && !opts.insecureListen) {
    throw new ForkdError(
      "bad_request",
      `refusing to serve plain HTTP on ${tcp.host} (not loopback): the token and every request would cross the network unencrypted; ` +
        "give --tls-cert and --tls-key, or --insecure-listen when a TLS proxy in front of the daemon terminates it",
    );
  }
  // The token and audit log go in FORKD_HOME: refuse a home others could read or swap first.
  ensureStateDir();
  const token = opts.tokenFile ? readTokenFile(opts.tokenFile) : ensureLocalToken(defaultTokenFile());
  // The daemon's secrets may live outside FORKD_HOME: no VMM it starts may see them either.
  const ownSecrets = [opts.tokenFile, opts.auditLog, opts.tlsKey].filter((p): p is string => Boolean(p)).map((p) => path.resolve(p));
  const restoreHidden = configureSettings({ confineHide: [...setting("confineHide"), ...ownSecrets] });
  const ctx = createServerContext({
    token,
    auditLog: opts.auditLog ?? path.join(forkdHome(), "audit.log"),
    log,
    maxSandboxes: opts.maxSandboxes,
    maxBranches: opts.maxBranches,
  });
  const { audit, agents } = ctx;

  // Reconcile before serving: dead sandboxes are reaped, live ones re-adopted, and what
  // a killed predecessor left half done is finished or undone (ops/cleanup.ts).
  const report = await cleanup();
  // A host that cannot apply the egress policy is refused here, not at the first fork.
  const restorePolicy = opts.networkPolicy === "off" ? configureSettings({ networkPolicy: "off" }) : () => {};
  markEgressPolicy(egressPolicyEnabled());
  if (egressPolicyEnabled()) await ensureEgressNamespace();
  else log("forkd daemon: the network egress policy is OFF: sandboxes reach the host's loopback services and private networks");
  const live = listSandboxes().filter((s) => s.alive);
  await Promise.all(
    live.map((s) => agents.get(s.id).catch((err: Error) => log(`forkd daemon: could not reconnect to ${s.id}: ${err.message}`))),
  );
  log(
    `forkd daemon: re-adopted ${live.length} sandbox(es), reaped ${report.reaped.length}${report.failedBranches.length ? `, marked ${report.failedBranches.length} interrupted BRANCH(es) failed` : ""}${report.resumedSources.length ? `, resumed ${report.resumedSources.length} source(s) they had paused` : ""}${report.abandonedStarts.length ? `, undid ${report.abandonedStarts.length} interrupted start(s)` : ""}`,
  );

  const servers: FastifyInstance[] = [];
  const socket = opts.socket ?? defaultSocketPath();
  if (path.resolve(path.dirname(socket)) === forkdRunDir()) ensureRuntimeDir();
  else fs.mkdirSync(path.dirname(socket), { recursive: true, mode: 0o700 });
  if (fs.existsSync(socket)) {
    if (await socketInUse(socket)) throw new ForkdError("conflict", `another daemon already listens on ${socket}`);
    fs.rmSync(socket, { force: true });
  }
  const unixServer = await buildServer(ctx, { requireToken: false });
  const oldUmask = process.umask(0o177);
  try {
    await unixServer.listen({ path: socket });
  } finally {
    process.umask(oldUmask);
  }
  fs.chmodSync(socket, 0o600);
  servers.push(unixServer);
  let tcpAddress: { host: string; port: number } | undefined;
  if (tcp) {
    const https = opts.tlsCert && opts.tlsKey ? { cert: fs.readFileSync(opts.tlsCert), key: fs.readFileSync(opts.tlsKey) } : undefined;
    const tcpServer = await buildServer(ctx, { requireToken: true, ...(https ? { https } : {}) });
    await tcpServer.listen({ host: tcp.host, port: tcp.port });
    const address = tcpServer.server.address();
    tcpAddress = { host: tcp.host, port: typeof address === "object" && address ? address.port : tcp.port };
    servers.push(tcpServer);
    ctx.e2b.tcpUrl = `${opts.tlsCert ? "https" : "http"}://${tcpAddress.host.includes(":") ? `[${tcpAddress.host}]` : tcpAddress.host}:${tcpAddress.port}`;
  }
  // The cluster is joined once this node answers on the address it advertises.
  const clusterUrl = opts.cluster ?? setting("cluster");
  if (clusterUrl) {
    const advertised =
      opts.advertiseUrl ??
      setting("advertiseUrl") ??
      (tcpAddress ? `${https(opts)}://${hostForUrl(tcpAddress.host)}:${tcpAddress.port}` : undefined);
    if (!advertised)
      throw new ForkdError("bad_request", "a cluster node needs --advertise-url (or a TCP --listen address the others can reach)");
    try {
      const config = clusterConfig({
        cluster: clusterUrl,
        name: opts.nodeName ?? setting("nodeName") ?? os.hostname(),
        url: advertised,
        token: readClusterToken({ file: opts.clusterTokenFile, value: setting("clusterToken") }),
        leaseTtlS: setting("clusterLeaseTtlS"),
        timeoutMs: setting("clusterTimeoutMs"),
        registry: opts.registry ?? setting("registry"),
        version: FORKD_VERSION,
      });
      ctx.cluster = await startCluster(ctx, config, log);
    } catch (err) {
      await Promise.all(servers.map((s) => s.close()));
      fs.rmSync(socket, { force: true });
      throw err;
    }
    log(`forkd daemon: cluster node ${ctx.cluster.name} (${ctx.cluster.config.url}), etcd ${clusterUrl}`);
  }
  // Pools refill once everything that survived the restart is re-adopted (pooled children included).
  ctx.hotPools.start();
  const stopE2b = startE2bTimeLimits(ctx.e2b);
  log(`forkd daemon ${FORKD_VERSION}: unix ${socket}${tcpAddress ? `, ${https(opts)}://${tcpAddress.host}:${tcpAddress.port}` : ""}`);

  // Sandboxes with a time limit are killed by this reaper.
  const reaper = setInterval(() => {
    expireSandboxes()
      .then((ids) => {
        for (const id of ids) agents.drop(id);
      })
      .catch((err: Error) => log(`forkd daemon: reaper: ${err.message}`));
  }, 1000);
  reaper.unref();
  const onHup = () => audit.reopen();
  process.on("SIGHUP", onHup);
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    process.off("SIGHUP", onHup);
    clearInterval(reaper);
    stopE2b();
    ctx.events.closeAll();
    ctx.watcher.stop();
    await Promise.all(servers.map((s) => s.close()));
    // Leave the cluster at once (the lease is revoked): the others do not wait out the TTL.
    await ctx.cluster?.close().catch((err: Error) => log(`forkd daemon: leaving the cluster: ${err.message}`));
    await ctx.hotPools.close();
    agents.closeAll();
    audit.close();
    fs.rmSync(socket, { force: true });
    restorePolicy();
    restoreHidden();
  };
  return { socket, ...(tcpAddress ? { tcp: tcpAddress } : {}), close };
}

/** An IPv6 address in a URL goes in brackets. */
function hostForUrl(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

function https(opts: DaemonOpts): string {
  return opts.tlsCert ? "https" : "http";
}
