import { ForkdError } from "@forkd/core";
import { startDaemon } from "@forkd/daemon";
import type { Command } from "commander";
import { parseIntOption } from "../ui.js";

type DaemonCliOpts = {
  socket?: string;
  listen: string;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  insecureListen?: boolean;
  auditLog?: string;
  maxSandboxes: number;
  networkPolicy: string;
  cluster?: string;
  nodeName?: string;
  advertiseUrl?: string;
  clusterTokenFile?: string;
  registry?: string;
};

export function registerDaemon(program: Command): void {
  program
    .command("daemon")
    .description("serve the REST API v1 on a unix socket (0600) and on loopback TCP; SIGTERM stops it, sandboxes keep running")
    .option("--socket <path>", "unix socket (default $FORKD_RUN_DIR/forkd.sock)")
    .option("--listen <host:port>", "TCP address, or 'none'", "127.0.0.1:8889")
    .option("--token-file <file>", "bearer token (at least 16 bytes); default: a random one kept in $FORKD_HOME/token")
    .option("--tls-cert <file>", "serve TCP over TLS with this certificate")
    .option("--tls-key <file>", "… and this key")
    .option("--insecure-listen", "allow plain HTTP on a non-loopback --listen address (only behind a TLS-terminating proxy)")
    .option("--audit-log <file>", "append-only JSON lines (default $FORKD_HOME/audit.log); reopened on SIGHUP")
    .option("--max-sandboxes <n>", "refuse forks beyond this many live sandboxes (503)", parseIntOption("--max-sandboxes"), 1000)
    .option("--max-branches <n>", "BRANCHes in progress at once; more get 503", parseIntOption("--max-branches"), 4)
    .option(
      "--network-policy <on|off>",
      "egress policy for sandboxes: on (public internet only, per-sandbox allow/deny) or off (they reach the host's loopback and private networks; `forkd doctor` fails)",
      "on",
    )
    .option("--cluster <etcd-url>", "join a forkd cluster through etcd: etcd://HOST:PORT[,HOST:PORT…] (FORKD_CLUSTER)")
    .option("--node-name <name>", "this node's name in the cluster (FORKD_NODE_NAME; default the host name)")
    .option(
      "--advertise-url <url>",
      "where the other nodes reach this daemon, http(s)://HOST:PORT (FORKD_ADVERTISE_URL; default the --listen address)",
    )
    .option("--cluster-token-file <file>", "the secret every node presents to the others (else FORKD_CLUSTER_TOKEN)")
    .option("--registry <oci-url>", "the OCI registry the nodes move snapshots through, oci://HOST/REPO (FORKD_CLUSTER_REGISTRY)")
    .action(async (opts: DaemonCliOpts) => {
      if (opts.networkPolicy !== "on" && opts.networkPolicy !== "off") {
        throw new ForkdError("bad_request", `--network-policy is on or off, got '${opts.networkPolicy}'`);
      }
      const daemon = await startDaemon({ ...opts, networkPolicy: opts.networkPolicy });
      await new Promise<void>((resolve) => {
        const stop = () => resolve();
        process.once("SIGTERM", stop);
        process.once("SIGINT", stop);
      });
      await daemon.close();
    });
}
