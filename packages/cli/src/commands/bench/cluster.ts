// bench cluster: three daemons on this machine joined through a real etcd, moving
// snapshots through a real docker-registry (both started here on loopback, in temp
// dirs, and removed after). Measures, in one run:
// - forwarding: p50 of an exec through a node that does not run the sandbox, less
//   the p50 of the same exec on its own node;
// - a fork of N from a tag staged on every node, spread by the cluster, against N
//   forked on one node (same run): their wall-time ratio;
// - a live fork of M children of a running sandbox spread over the three nodes:
//   bytes pushed against the captured layer, and the wall time until every child answered.
// On one machine the three nodes share its cores: spreading cannot make a fork
// faster here, so the ratio shows what the cluster's coordination costs.
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { ForkdError, forkdHome, settingsEnv } from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, plainTable, spinner } from "../../ui.js";
import { processesUnder } from "./daemon-under-test.js";
import { emit, machine, p50, round1 } from "./report.js";

const FORWARDED_HEADER = "x-forkd-forwarded-by";
const CLUSTER_TOKEN_HEADER = "x-forkd-cluster-token";

type Proc = { child: ChildProcess; log: () => string };

function start(cmd: string, args: string[], env?: NodeJS.ProcessEnv): Proc {
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"], ...(env ? { env } : {}) });
  let log = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (log = (log + d).slice(-20_000)));
  return { child, log: () => log };
}

async function stop(p: Proc): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return;
  const exited = new Promise<void>((r) => p.child.once("exit", () => r()));
  p.child.kill("SIGTERM");
  const timer = setTimeout(() => p.child.kill("SIGKILL"), 15_000);
  await exited;
  clearTimeout(timer);
}

async function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function until(what: string, p: Proc, ok: () => Promise<boolean>, ms = 60_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await ok().catch(() => false)) return;
    if (p.child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new ForkdError("internal", `${what} did not start: ${p.log().trim().slice(-2000)}`);
}

type Node = {
  name: string;
  url: string;
  token: string;
  root: string;
  shmDir: string;
  proc: Proc;
  args: string[];
};

type Call = <T = unknown>(node: Node, method: string, urlPath: string, body?: unknown, headers?: Record<string, string>) => Promise<T>;

export function registerClusterBench(bench: Command): void {
  bench
    .command("cluster")
    .description("3 daemons on this machine (real etcd and registry): forwarding overhead, spread fork vs one node, live fork spread")
    .option("-n, --count <n>", "children of the spread fork (and of the one-node fork it is compared with)", parseIntOption("-n"), 30)
    .option("--live <n>", "children of the live fork spread over the three nodes", parseIntOption("--live"), 12)
    .option("--execs <n>", "execs per path for the forwarding overhead", parseIntOption("--execs"), 40)
    .option("--memory-mib <n>", "guest memory (128 on a 2-core machine)", parseIntOption("--memory-mib"), 128)
    .option("--image <name>", "guest image", "base")
    .option("--json", "print JSON")
    .action(async (opts: { count: number; live: number; execs: number; memoryMib: number; image: string; json?: boolean }) => {
      if (opts.count < 3 || opts.count > 300) throw new ForkdError("bad_request", "-n must be from 3 to 300");
      if (opts.live < 3 || opts.live > 300) throw new ForkdError("bad_request", "--live must be from 3 to 300");
      const s = spinner("starting etcd and a registry");
      const procs: Proc[] = [];
      const dirs: string[] = [];
      const nodes: Node[] = [];
      const clusterToken = randomBytes(24).toString("base64url");
      const call: Call = async (node, method, urlPath, body, headers = {}) => {
        const res = await fetch(`${node.url}${urlPath}`, {
          method,
          headers: {
            authorization: `Bearer ${node.token}`,
            ...(body !== undefined ? { "content-type": "application/json" } : {}),
            ...headers,
          },
          ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
          signal: AbortSignal.timeout(900_000),
        });
        const text = await res.text();
        if (!res.ok) throw new ForkdError("internal", `${node.name} ${method} ${urlPath}: HTTP ${res.status} ${text.slice(0, 500)}`);
        return (text ? JSON.parse(text) : undefined) as never;
      };
      try {
        const work = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-bench-cluster-"));
        dirs.push(work);
        const clientPort = await freePort("127.0.0.1");
        const peerPort = await freePort("127.0.0.1");
        const etcd = start("etcd", [
          "--name=bench",
          `--data-dir=${path.join(work, "etcd")}`,
          `--listen-client-urls=http://127.0.0.1:${clientPort}`,
          `--advertise-client-urls=http://127.0.0.1:${clientPort}`,
          `--listen-peer-urls=http://127.0.0.1:${peerPort}`,
          `--initial-advertise-peer-urls=http://127.0.0.1:${peerPort}`,
          `--initial-cluster=bench=http://127.0.0.1:${peerPort}`,
          "--log-level=error",
        ]);
        procs.push(etcd);
        await until("etcd", etcd, async () => (await fetch(`http://127.0.0.1:${clientPort}/health`)).ok);
        const registryPort = await freePort("127.0.0.1");
        fs.writeFileSync(
          path.join(work, "registry.yml"),
          `version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${path.join(work, "registry")}\nhttp:\n  addr: 127.0.0.1:${registryPort}\n  secret: ${randomBytes(16).toString("hex")}\n`,
        );
        const registry = start("/usr/bin/docker-registry", ["serve", path.join(work, "registry.yml")]);
        procs.push(registry);
        await until("docker-registry", registry, async () => (await fetch(`http://127.0.0.1:${registryPort}/v2/`)).status === 200);
        const tokenFile = path.join(work, "cluster-token");
        fs.writeFileSync(tokenFile, `${clusterToken}\n`, { mode: 0o600 });

        /** Start node `name`; `again` restarts it in the home, run and staging dirs it had (its snapshots kept). */
        const startNode = async (name: string, index: number, extra: string[], again?: Node): Promise<Node> => {
          s.text = `starting node ${name}`;
          const host = `127.0.0.${index + 1}`;
          const port = await freePort(host);
          const root = again?.root ?? fs.mkdtempSync(path.join(work, `node-${name}-`));
          const shmDir = again?.shmDir ?? fs.mkdtempSync(path.join("/dev/shm", `forkd-bench-${name}-`));
          const home = path.join(root, "home");
          const token = again?.token ?? randomBytes(24).toString("base64url");
          if (!again) {
            dirs.push(shmDir);
            fs.mkdirSync(home, { mode: 0o700 });
            fs.mkdirSync(path.join(root, "run"), { mode: 0o700 });
            const images = path.join(forkdHome(), "images");
            if (fs.existsSync(images)) fs.symlinkSync(images, path.join(home, "images"));
            fs.writeFileSync(path.join(root, "token"), `${token}\n`, { mode: 0o600 });
          }
          const url = `http://${host}:${port}`;
          const args = [
            process.argv[1]!,
            "daemon",
            "--listen",
            `${host}:${port}`,
            "--socket",
            path.join(root, "forkd.sock"),
            "--token-file",
            path.join(root, "token"),
            "--audit-log",
            path.join(root, "audit.log"),
            "--cluster",
            `etcd://127.0.0.1:${clientPort}`,
            "--node-name",
            name,
            "--advertise-url",
            url,
            "--cluster-token-file",
            tokenFile,
            "--registry",
            `oci://127.0.0.1:${registryPort}/forkd/bench`,
            ...extra,
          ];
          const proc = start(process.execPath, args, settingsEnv({ home, runDir: path.join(root, "run"), shmDir }));
          const node: Node = { name, url, token, root, shmDir, proc, args };
          await until(`node ${name}`, proc, async () => {
            await call(node, "GET", "/v1/cluster/nodes");
            return true;
          });
          return node;
        };
        const bigEnough = ["--max-sandboxes", String(opts.count + 2)];
        for (const [i, name] of ["a", "b", "c"].entries()) {
          const node = await startNode(name, i, bigEnough);
          nodes.push(node);
          procs.push(node.proc);
        }
        const [a, b, c] = nodes as [Node, Node, Node];
        const tag = `bench-cluster-${randomBytes(3).toString("hex")}`;
        s.text = `snapshot ${tag} (${opts.memoryMib} MiB) on a`;
        await call(a, "POST", "/v1/snapshots", { tag, image: opts.image, memory_mib: opts.memoryMib });

        // 1. Forwarding overhead: one child on a, execs on a and through b, interleaved.
        s.text = "forwarding overhead";
        const [probe] = await call<{ id: string }[]>(a, "POST", "/v1/sandboxes", { snapshot_tag: tag, n: 1 });
        const direct: number[] = [];
        const forwarded: number[] = [];
        for (let i = 0; i < opts.execs + 3; i++) {
          for (const [via, into] of [
            [a, direct],
            [b, forwarded],
          ] as const) {
            const t0 = performance.now();
            await call(via, "POST", `/v1/sandboxes/${probe!.id}/exec`, { cmd: "true" });
            if (i >= 3) into.push(performance.now() - t0); // the first few warm connections and caches
          }
        }
        await call(a, "DELETE", `/v1/sandboxes/${probe!.id}`);

        // 2. The tag on every node (pushed by a, pulled by b and c, staged by one child each), then N on one node vs N spread.
        s.text = "staging the tag on every node";
        const runJob = async (node: Node, urlPath: string, body: unknown) => {
          const job = await call<{ id: string }>(node, "POST", urlPath, body);
          for (;;) {
            const j = await call<{ status: string; error: { message: string } | null }>(node, "GET", `/v1/jobs/${job.id}`);
            if (j.status === "succeeded") return;
            if (j.status === "failed") throw new ForkdError("internal", `${urlPath} on ${node.name}: ${j.error?.message}`);
            await new Promise((r) => setTimeout(r, 200));
          }
        };
        const ref = `127.0.0.1:${registryPort}/forkd/bench:${tag}`;
        await runJob(a, `/v1/snapshots/${tag}/push`, { ref });
        const local = { [FORWARDED_HEADER]: "bench", [CLUSTER_TOKEN_HEADER]: clusterToken };
        for (const node of nodes) {
          if (node !== a) await runJob(node, "/v1/snapshots/pull", { ref });
          // Served where it lands (a node-to-node call): stages the tag there.
          const [one] = await call<{ id: string }[]>(node, "POST", "/v1/sandboxes", { snapshot_tag: tag, n: 1 }, local);
          await call(node, "DELETE", `/v1/sandboxes/${one!.id}`);
        }
        s.text = `${opts.count} children on one node`;
        let t0 = performance.now();
        const single = await call<{ id: string }[]>(a, "POST", "/v1/sandboxes", { snapshot_tag: tag, n: opts.count }, local);
        const singleMs = performance.now() - t0;
        for (const x of single) await call(a, "DELETE", `/v1/sandboxes/${x.id}`);
        s.text = `${opts.count} children spread over the cluster`;
        t0 = performance.now();
        const spread = await call<{ id: string; node: string }[]>(a, "POST", "/v1/sandboxes", { snapshot_tag: tag, n: opts.count });
        const spreadMs = performance.now() - t0;
        const spreadNodes = Object.fromEntries(["a", "b", "c"].map((n) => [n, spread.filter((x) => x.node === n).length]));
        for (const x of spread) await call(a, "DELETE", `/v1/sandboxes/${x.id}`);

        // 3. Live fork spread: a restarted with room for a third of the children (the source counts), so the rest must spread.
        s.text = "restarting a with less room";
        await stop(a.proc);
        const share = Math.ceil(opts.live / 3);
        const a2 = await startNode("a", 0, ["--max-sandboxes", String(share + 1)], a);
        procs.push(a2.proc);
        nodes[0] = a2;
        const [source] = await call<{ id: string }[]>(a2, "POST", "/v1/sandboxes", { snapshot_tag: tag, n: 1 });
        await call(a2, "POST", `/v1/sandboxes/${source!.id}/exec`, {
          cmd: "dd if=/dev/urandom of=/root/state bs=1M count=4 2>/dev/null; md5sum /root/state > /root/state.md5",
        });
        s.text = `live fork of ${opts.live} over three nodes`;
        t0 = performance.now();
        const live = await call<{
          tag: string;
          sandboxes: { id: string; node?: string }[];
          spread?: {
            pushed_bytes: number;
            layer_bytes: number;
            full_pack_bytes: number;
            pulled: { node: string; downloaded_bytes: number; transfer_bytes: number }[];
            shares: { node: string; n: number }[];
          };
        }>(c, "POST", `/v1/sandboxes/${source!.id}/fork`, { n: opts.live });
        const answers = await Promise.allSettled(live.sandboxes.map((x) => call(b, "POST", `/v1/sandboxes/${x.id}/ping`)));
        const liveWallMs = performance.now() - t0;
        const seen = await Promise.allSettled(
          live.sandboxes.map(async (x, i) => {
            if (answers[i]!.status !== "fulfilled") throw new ForkdError("vm_timeout", `${x.id} did not answer`);
            const out = await call<{ stdout: string }>(b, "POST", `/v1/sandboxes/${x.id}/exec`, {
              cmd: "md5sum -c /root/state.md5 >/dev/null && echo ok",
            });
            if (out.stdout.trim() !== "ok") throw new ForkdError("internal", `${x.id} does not see the source's state`);
          }),
        );
        for (const x of [...live.sandboxes, source!]) await call(b, "DELETE", `/v1/sandboxes/${x.id}`).catch(() => {});
        s.stop();
        const info = live.spread;
        const result = {
          nodes: 3,
          forward_overhead_ms_p50: round1(p50(forwarded) - p50(direct)),
          exec_direct_ms_p50: p50(direct),
          exec_forwarded_ms_p50: p50(forwarded),
          spread_fork_n: opts.count,
          spread_fork_ms: round1(spreadMs),
          single_node_fork_ms: round1(singleMs),
          spread_fork_ratio: Math.round((spreadMs / singleMs) * 100) / 100,
          spread_fork_nodes: spreadNodes,
          live_spread_n: opts.live,
          live_spread_ok: seen.filter((x) => x.status === "fulfilled").length,
          live_spread_shares: Object.fromEntries((info?.shares ?? []).map((x) => [x.node, x.n])),
          live_spread_pushed_bytes: info?.pushed_bytes ?? 0,
          live_spread_layer_bytes: info?.layer_bytes ?? 0,
          live_spread_full_pack_bytes: info?.full_pack_bytes ?? 0,
          live_spread_pushed_ratio: info && info.layer_bytes > 0 ? Math.round((info.pushed_bytes / info.layer_bytes) * 100) / 100 : null,
          live_spread_pulled: info?.pulled ?? [],
          live_spread_wall_ms: round1(liveWallMs),
          memory_mib: opts.memoryMib,
          load_1m: round1(os.loadavg()[0] ?? 0),
          ...(await machine()),
        };
        emit("cluster", result, opts, (r) => {
          const t = plainTable(["FIGURE", "VALUE"]);
          t.push(["nodes", String(r.nodes)]);
          t.push(["exec p50 direct / through another node", `${r.exec_direct_ms_p50} / ${r.exec_forwarded_ms_p50} ms`]);
          t.push(["forwarding overhead p50", `${r.forward_overhead_ms_p50} ms`]);
          t.push([
            `fork of ${opts.count}: one node / spread`,
            `${r.single_node_fork_ms} / ${r.spread_fork_ms} ms (${JSON.stringify(spreadNodes)})`,
          ]);
          t.push(["spread fork ratio", String(r.spread_fork_ratio)]);
          t.push([
            `live fork of ${opts.live} over 3 nodes: answering`,
            `${r.live_spread_ok} / ${opts.live} in ${r.live_spread_wall_ms} ms`,
          ]);
          t.push([
            "bytes pushed / captured layer",
            `${result.live_spread_pushed_bytes} / ${result.live_spread_layer_bytes} (${r.live_spread_pushed_ratio})`,
          ]);
          for (const p of result.live_spread_pulled)
            t.push([`pulled by ${p.node} / whole chain`, `${p.downloaded_bytes} / ${p.transfer_bytes}`]);
          t.push(["machine", `${r.cpu_model}, ${r.cpus} CPUs, ${r.accel}, load ${r.load_1m}`]);
          return t.toString();
        });
        if (result.live_spread_ok < opts.live) process.exitCode = 1;
      } finally {
        s.stop();
        for (const p of procs.reverse()) await stop(p).catch(() => {});
        for (const n of nodes) {
          for (const pid of processesUnder([n.root, n.shmDir])) {
            try {
              process.kill(pid, "SIGKILL");
            } catch {
              // gone meanwhile
            }
          }
        }
        for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
      }
    });
}
