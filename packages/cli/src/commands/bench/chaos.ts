// bench chaos: N times, start a random operation through a real daemon (a warm
// snapshot, a fork of several children, BRANCH full/diff/live, rmi, unpack, pull)
// and kill -9 the daemon at a random moment within it; restart it, let start-up
// recovery run, and count what the crash left: half snapshots (listed but not
// forkable), orphan VMMs, paused sources, lost sandboxes (answering before the
// kill, not after re-adoption) and leftover files. Every count must be 0.
// The daemon runs in a home, run dir and /dev/shm dir of its own, so whatever is
// found there is this campaign's; guest images are shared (linked in).
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { cleanup, configureSettings, ForkdError, findLeftovers, forkdHome, settingsEnv } from "@forkd/core";
import { Controller } from "@forkd/sdk";
import type { Command } from "commander";
import { parseIntOption, plainTable, spinner } from "../../ui.js";
import { processesUnder } from "./daemon-under-test.js";
import { startRegistry } from "./pack.js";
import { emit, machine, p50, round1 } from "./report.js";

const OPS = ["snapshot", "fork", "branch-full", "branch-diff", "branch-live", "rmi", "unpack", "pull"] as const;
type Op = (typeof OPS)[number];

/** First guesses of how long each operation takes (128 MiB guests, TCG); replaced by what is measured. */
const FIRST_ESTIMATE_MS: Record<Op, number> = {
  snapshot: 8000,
  fork: 4000,
  "branch-full": 2000,
  "branch-diff": 2000,
  "branch-live": 2000,
  rmi: 100,
  unpack: 3000,
  pull: 3000,
};

type ChaosResult = {
  kills: number;
  seed: number;
  ops: Record<string, number>;
  /** Kills that landed while the operation was still running (the rest came just after it answered). */
  killed_mid_op: number;
  half_snapshots: number;
  orphan_vmms: number;
  paused_sources: number;
  lost_sandboxes: number;
  leftover_files: number;
  /** Partly downloaded blobs a killed pull keeps on purpose, to resume from (README: moving snapshots). */
  resumable_downloads: number;
  /** What each non-zero count was, for the first few. */
  findings: string[];
  kill_s_p50: number;
  recovery_s_p50: number;
  ops_skipped: string[];
};

/** A small seeded generator (mulberry32): a run can be repeated with --seed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Daemon = { child: ChildProcess; api: Controller; exited: Promise<void> };

class Campaign {
  readonly root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-chaos-"));
  readonly home = path.join(this.root, "home");
  readonly runDir = path.join(this.root, "run");
  // On shmem, as in production: live BRANCH needs it.
  readonly shmDir = fs.mkdtempSync(path.join("/dev/shm", "forkd-chaos-"));
  readonly socket = path.join(this.root, "forkd.sock");
  readonly token = randomBytes(24).toString("base64url");
  private readonly restoreSettings: () => void;
  daemon: Daemon | undefined;

  constructor() {
    fs.mkdirSync(this.home, { mode: 0o700 });
    fs.mkdirSync(this.runDir, { mode: 0o700 });
    const images = path.join(forkdHome(), "images");
    if (fs.existsSync(images)) fs.symlinkSync(images, path.join(this.home, "images"));
    fs.writeFileSync(path.join(this.root, "token"), `${this.token}\n`, { mode: 0o600 });
    // This process reads the same state the daemon writes (findLeftovers, cleanup at the end).
    this.restoreSettings = configureSettings({ home: this.home, runDir: this.runDir, shmDir: this.shmDir });
  }

  async start(): Promise<Daemon> {
    const child = spawn(
      process.execPath,
      [process.argv[1]!, "daemon", "--socket", this.socket, "--listen", "none", "--token-file", path.join(this.root, "token")],
      { env: settingsEnv(), stdio: ["ignore", "ignore", "pipe"] },
    );
    let log = "";
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (log = (log + d).slice(-8000)));
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    const deadline = Date.now() + 120_000;
    while (!/unix /.test(log)) {
      if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
        child.kill("SIGKILL");
        throw new ForkdError("internal", `the daemon did not start: ${log.trim().slice(-2000)}`);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    this.daemon = { child, api: new Controller({ socketPath: this.socket, token: this.token, requestTimeoutMs: 600_000 }), exited };
    return this.daemon;
  }

  async kill9(): Promise<void> {
    const d = this.daemon!;
    d.child.kill("SIGKILL");
    await d.exited;
    await d.api.close().catch(() => {});
  }

  async teardown(): Promise<void> {
    const d = this.daemon;
    if (d && d.child.exitCode === null && d.child.signalCode === null) {
      for (const s of await d.api.listSandboxes().catch(() => [])) await d.api.deleteSandbox(s.id).catch(() => {});
      await d.api.close().catch(() => {});
      d.child.kill("SIGTERM");
      await d.exited;
    }
    // Anything still naming these dirs would be a leak the counts above already reported: not left running.
    for (const pid of processesUnder([this.root, this.shmDir])) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
    }
    await cleanup().catch(() => {});
    this.restoreSettings();
    fs.rmSync(this.root, { recursive: true, force: true });
    fs.rmSync(this.shmDir, { recursive: true, force: true });
  }
}

async function answering(api: Controller, ids: string[]): Promise<Set<string>> {
  const ok = new Set<string>();
  for (const id of ids) {
    const pong = await api.ping(id).catch(() => undefined);
    if (pong?.pong) ok.add(id);
  }
  return ok;
}

export function registerChaosBench(bench: Command): void {
  bench
    .command("chaos")
    .description(
      "kill -9 a real daemon at a random moment of a random operation N times; count half snapshots, orphan VMMs, paused sources, lost sandboxes and leftover files after each restart (all must be 0)",
    )
    .option("--kills <n>", "how many operations to kill the daemon in", parseIntOption("--kills"), 10)
    .option("--memory-mib <n>", "RAM of every guest", parseIntOption("--memory-mib"), 128)
    .option("--seed <n>", "random seed (a run is repeatable with the same seed)", parseIntOption("--seed"))
    .option("--json", "print JSON")
    .action(async (opts: { kills: number; memoryMib: number; seed?: number; json?: boolean }) => {
      if (opts.kills < 1) throw new ForkdError("bad_request", "--kills must be at least 1");
      const seed = opts.seed ?? randomBytes(4).readUInt32LE(0);
      const random = rng(seed);
      const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
      const s = spinner("starting a daemon");
      const campaign = new Campaign();
      let registry: ChildProcess | undefined;
      try {
        let d = await campaign.start();
        const BASE = "chaos-base";
        s.text = `warm snapshot (${opts.memoryMib} MiB)`;
        await d.api.createSnapshot({ tag: BASE, memory_mib: opts.memoryMib });
        // Sandboxes that live through every kill: BRANCH sources, and what must be re-adopted.
        const keepers = (await d.api.createSandboxes({ snapshot_tag: BASE, n: 2 })).map((c) => c.id);
        s.text = "a pack to unpack";
        const pack = path.join(campaign.root, "base.forkd.tar.zst");
        const packJob = await d.api.packSnapshot(BASE, { path: pack });
        if ((await d.api.waitForJob(packJob.id)).status !== "succeeded") throw new ForkdError("internal", "packing the base failed");
        const skipped: string[] = [];
        let ref: string | undefined;
        try {
          s.text = "a registry to pull from";
          const reg = await startRegistry(fs.mkdtempSync(path.join(campaign.root, "registry-")));
          registry = reg.child;
          ref = `127.0.0.1:${reg.port}/forkd-chaos/base:v1`;
          const push = await d.api.pushSnapshot(BASE, { ref });
          if ((await d.api.waitForJob(push.id)).status !== "succeeded") throw new ForkdError("internal", "pushing the base failed");
        } catch (err) {
          skipped.push(`pull (${(err as Error).message})`);
          ref = undefined;
        }
        // Live BRANCH needs nothing of the host: every sandbox is a child of a staged image.
        const ops = OPS.filter((op) => op !== "pull" || ref);

        const estimate = { ...FIRST_ESTIMATE_MS };
        const counts = { half: 0, orphan: 0, paused: 0, lost: 0, leftover: 0 };
        const findings: string[] = [];
        const note = (what: string) => {
          if (findings.length < 20) findings.push(what);
        };
        const opCount: Record<string, number> = {};
        let midOp = 0;
        let resumable = 0;
        const killTimes: number[] = [];
        const recoveryTimes: number[] = [];
        const verified = new Set<string>([BASE]);
        const extras: string[] = [];
        let serial = 0;
        const tag = (kind: string) => `chaos-${kind}-${++serial}`;
        const removable = async () => (await d.api.listSnapshots()).filter((x) => x.status === "ready" && x.tag !== BASE).map((x) => x.tag);

        for (let i = 1; i <= opts.kills; i++) {
          const t0 = performance.now();
          // Bounded: few extra children, few snapshots, so a long campaign costs the same per kill.
          while (extras.length > 3) await d.api.deleteSandbox(extras.shift()!).catch(() => {});
          let op = pick(ops);
          if ((await removable()).length > 5) op = "rmi";
          if (op === "rmi" && (await removable()).length === 0) {
            await d.api.branchSandbox(pick(keepers), { tag: tag("victim"), mode: "diff" });
          }
          opCount[op] = (opCount[op] ?? 0) + 1;
          s.text = `kill ${i}/${opts.kills}: ${op}`;
          const before = await answering(
            d.api,
            (await d.api.listSandboxes()).map((x) => x.id),
          );
          const api = d.api;
          const run = async (): Promise<unknown> => {
            switch (op) {
              case "snapshot":
                return api.createSnapshot({ tag: tag("s"), memory_mib: opts.memoryMib });
              case "fork":
                return (await api.createSandboxes({ snapshot_tag: BASE, n: 3 })).map((c) => extras.push(c.id));
              case "branch-full":
              case "branch-diff":
              case "branch-live":
                return api.branchSandbox(pick(keepers), { tag: tag("b"), mode: op.slice("branch-".length) as "full" | "diff" | "live" });
              case "rmi":
                return api.deleteSnapshot(pick(await removable()));
              case "unpack":
                return api.waitForJob((await api.unpackSnapshot({ path: pack, tag: tag("u") })).id);
              case "pull":
                return api.waitForJob((await api.pullSnapshot({ ref: ref!, tag: tag("p") })).id);
            }
          };
          const started = performance.now();
          let finishedAt: number | undefined;
          const work = run().then(
            () => {
              finishedAt = performance.now();
            },
            () => {
              finishedAt = performance.now();
            },
          );
          const delay = random() * estimate[op];
          await new Promise((r) => setTimeout(r, delay));
          const finishedBeforeKill = finishedAt;
          if (finishedBeforeKill === undefined) midOp++;
          await campaign.kill9();
          await work;
          // How long it took when it finished first teaches the next kill where "within" is.
          if (finishedBeforeKill !== undefined) estimate[op] = (estimate[op] + (finishedBeforeKill - started)) / 2;
          const r0 = performance.now();
          d = await campaign.start();
          recoveryTimes.push((performance.now() - r0) / 1000);

          const left = await findLeftovers();
          counts.orphan += left.orphanVmms.length;
          for (const o of left.orphanVmms) note(`kill ${i} (${op}): orphan VMM pid ${o.pid} in ${o.runDir}`);
          counts.paused += left.pausedSources.length;
          for (const p of left.pausedSources) note(`kill ${i} (${op}): ${p.id} is ${p.status}`);
          counts.leftover += left.leftoverFiles.length;
          for (const f of left.leftoverFiles) note(`kill ${i} (${op}): leftover ${f}`);
          counts.half += left.halfSnapshots.length;
          for (const h of left.halfSnapshots) note(`kill ${i} (${op}): half snapshot ${h}`);
          // Listed and ready means forkable: every snapshot that appeared since the last check is forked once.
          for (const snap of await d.api.listSnapshots()) {
            if (snap.status === "writing") {
              counts.half++;
              note(`kill ${i} (${op}): ${snap.tag} still listed as writing after recovery`);
            }
            if (snap.status !== "ready" || verified.has(snap.tag)) continue;
            try {
              const [child] = await d.api.createSandboxes({ snapshot_tag: snap.tag, n: 1 });
              await d.api.ping(child!.id);
              await d.api.deleteSandbox(child!.id);
              verified.add(snap.tag);
            } catch (err) {
              counts.half++;
              note(`kill ${i} (${op}): ${snap.tag} is listed but not forkable: ${(err as Error).message}`);
            }
          }
          const after = await answering(d.api, [...before]);
          for (const id of before) {
            if (after.has(id)) continue;
            counts.lost++;
            note(`kill ${i} (${op}): ${id} answered before the kill and not after`);
          }
          for (let k = extras.length - 1; k >= 0; k--) if (!after.has(extras[k]!) && !before.has(extras[k]!)) extras.splice(k, 1);
          resumable = (() => {
            try {
              return fs.readdirSync(path.join(campaign.home, "hub", "blobs")).filter((n) => n.endsWith(".partial")).length;
            } catch {
              return 0;
            }
          })();
          killTimes.push((performance.now() - t0) / 1000);
        }
        s.stop();
        const result: ChaosResult & Record<string, unknown> = {
          ...(await machine()),
          kills: opts.kills,
          seed,
          memory_mib: opts.memoryMib,
          ops: opCount,
          killed_mid_op: midOp,
          half_snapshots: counts.half,
          orphan_vmms: counts.orphan,
          paused_sources: counts.paused,
          lost_sandboxes: counts.lost,
          leftover_files: counts.leftover,
          resumable_downloads: resumable,
          findings,
          kill_s_p50: p50(killTimes),
          recovery_s_p50: p50(recoveryTimes),
          ops_skipped: skipped,
        };
        emit("chaos", result, opts, () => {
          const table = plainTable(["COUNT", "VALUE"]);
          for (const key of ["half_snapshots", "orphan_vmms", "paused_sources", "lost_sandboxes", "leftover_files"] as const) {
            table.push([key, `${result[key]}${result[key] === 0 ? " ✓" : " ✗"}`]);
          }
          const ops = plainTable(["OPERATION", "KILLS"]);
          for (const [name, n] of Object.entries(opCount)) ops.push([name, String(n)]);
          return [
            `${result.kills} kills (${midOp} mid-operation), seed ${seed}, ${result.cpu_model} × ${result.cpus}, accel ${result.accel}, ${opts.memoryMib} MiB guests`,
            table.toString(),
            ops.toString(),
            `per kill p50 ${result.kill_s_p50} s (restart and recovery p50 ${round1(result.recovery_s_p50)} s); resumable downloads kept: ${resumable}`,
            ...(skipped.length ? [`skipped: ${skipped.join("; ")}`] : []),
            ...findings,
          ].join("\n");
        });
        if (counts.half + counts.orphan + counts.paused + counts.lost + counts.leftover > 0) process.exitCode = 1;
      } finally {
        s.stop();
        registry?.kill("SIGKILL");
        await campaign.teardown();
      }
    });
}
