import fs from "node:fs";
import { validateCpuLimit } from "@forkd/core/cgroup";
import { forkdHome } from "@forkd/core/config";
import { ForkdError } from "@forkd/core/errors";
import type { Command } from "commander";
import { type Backend, type ForkRow, type LiveForkRows, openBackend } from "../backend.js";
import { percentile, round1 } from "../stats.js";
import { collect, fmtMs, parseIntOption, plainTable, spinner } from "../ui.js";

type ForkCliOpts = {
  tag?: string;
  fromSandbox?: string;
  n: number;
  memoryLimitMib?: number;
  cpuLimit?: number;
  net: boolean;
  allowOut: string[];
  denyOut: string[];
  json?: boolean;
  concurrency?: number;
};

function parseCpuLimit(value: string): number {
  if (!/^(\d+\.?\d*|\.\d+)$/.test(value))
    throw new ForkdError("bad_request", `--cpu-limit must be a number of CPUs such as 0.5 or 2, got '${value}'`);
  return validateCpuLimit(Number(value), "--cpu-limit");
}

async function forkLiveCommand(
  backend: Backend,
  id: string,
  opts: { n: number; concurrency?: number | undefined; json?: boolean | undefined; tag?: string | undefined },
): Promise<void> {
  const s = spinner(`forking ${opts.n} from running sandbox ${id}`);
  let res: LiveForkRows;
  try {
    res = await backend.forkLive(id, { n: opts.n, concurrency: opts.concurrency, ...(opts.tag ? { tag: opts.tag } : {}) });
  } finally {
    s.stop();
  }
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(res, null, 2)}\n`);
    return;
  }
  const table = plainTable(["ID", "VMM START", "RESTORE", "FIRST ANSWER (IDENTITY)", "TOTAL"]);
  for (const r of res.children) {
    if (r.ok)
      table.push([r.id, fmtMs(r.vmm_start_ms ?? 0), fmtMs(r.restore_ms ?? 0), fmtMs(r.first_answer_ms ?? 0), fmtMs(r.total_ms ?? 0)]);
  }
  process.stdout.write(`${table.toString()}\n`);
  process.stdout.write(
    `${res.children.length} children of ${id} up in ${fmtMs(res.total_ms)}: source paused ${fmtMs(res.source_pause_ms)} (${res.captured_pages} written pages copied), capture ready in ${fmtMs(res.capture_ready_ms)}; snapshot ${res.tag}\n`,
  );
}

export function registerSandboxes(program: Command): void {
  program
    .command("ping")
    .description("ask a sandbox's agent to answer (forkd's ping)")
    .argument("<id>")
    .action(async (id: string) => {
      process.stdout.write(`${JSON.stringify(await (await openBackend()).ping(id), null, 2)}\n`);
    });

  program
    .command("where")
    .description("print where forkd keeps its state (FORKD_HOME)")
    .action(() => {
      process.stdout.write(`${forkdHome()}\n`);
    });

  program
    .command("spawn")
    .description("forkd's spawn: restore N children from a snapshot (the same as fork, with forkd's flags)")
    .requiredOption("--tag <tag>", "snapshot to spawn from")
    .option("-n, --n <n>", "number of children (1-1000)", parseIntOption("-n"), 1)
    .option("--per-child-netns", "accepted: every sandbox here has a private network and its own egress rules")
    .option("--memory-limit-mib <m>", "cap each child's host memory with a cgroup", parseIntOption("--memory-limit-mib"))
    .option("--prewarm", "accepted: children here are always restored warm")
    .option("--live-fork", "accepted: every child here can be live-BRANCHed")
    .option("--hugepages", "accepted and ignored")
    .option("--json", "print a JSON array of children")
    .action(async (opts: { tag: string; n: number; memoryLimitMib?: number; json?: boolean }) => {
      if (opts.n < 1 || opts.n > 1000) throw new ForkdError("bad_request", `-n must be from 1 to 1000, got ${opts.n}`);
      const backend = await openBackend();
      const s = spinner(`spawning ${opts.n} from ${opts.tag}`);
      let results: ForkRow[];
      try {
        results = await backend.fork({
          tag: opts.tag,
          n: opts.n,
          ...(opts.memoryLimitMib !== undefined ? { memoryLimitMib: opts.memoryLimitMib } : {}),
          network: true,
        });
      } finally {
        s.stop();
      }
      if (opts.json) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
      else for (const r of results) process.stdout.write(r.ok ? `  ✓ ${r.id}\n` : `  ✗ ${r.id}: ${r.error?.message}\n`);
      if (results.some((r) => !r.ok)) process.exitCode = 1;
    });

  program
    .command("fork")
    .description(
      "restore N children from a snapshot (--tag), or of a running sandbox (--from-sandbox: paused only while what it wrote is copied); children keep running after this command exits",
    )
    .option("--tag <tag>", "snapshot to fork from")
    .option("--from-sandbox <id>", "running sandbox to fork live; its capture becomes snapshot --live-tag (default SOURCE_TAG-live-…)")
    .option("--live-tag <tag>", "with --from-sandbox: the snapshot its capture is registered as")
    .option("-n, --count <n>", "number of children (1-1000)", parseIntOption("-n"), 1)
    .option("--memory-limit-mib <m>", "cap each child's host memory with a cgroup", parseIntOption("--memory-limit-mib"))
    .option("--cpu-limit <cpus>", "cap each child's CPU use with a cgroup quota, fractions allowed (default: its vCPUs)", parseCpuLimit)
    .option("--no-net", "children get no outbound network (the NIC stays, isolated)")
    .option("--allow-out <dest>", "also reach this IP, CIDR, IP:PORT, [v6]:PORT or CIDR:PORT the default denies (repeatable)", collect, [])
    .option(
      "--deny-out <dest>",
      "never reach this destination the default allows (repeatable; --allow-out wins where both match)",
      collect,
      [],
    )
    .option("--concurrency <n>", "restores in flight at once (default: 4 per core)", parseIntOption("--concurrency"))
    .option("--json", "print a JSON array of children with timings")
    .action(async (opts: ForkCliOpts & { count: number; liveTag?: string }) => {
      const n = opts.count;
      if (n < 1 || n > 1000) throw new ForkdError("bad_request", `-n must be from 1 to 1000, got ${n}`);
      if (Boolean(opts.tag) === Boolean(opts.fromSandbox)) {
        throw new ForkdError("bad_request", "name what to fork: --tag SNAPSHOT, or --from-sandbox ID for a running sandbox");
      }
      const backend = await openBackend();
      if (opts.fromSandbox) {
        await forkLiveCommand(backend, opts.fromSandbox, { n, concurrency: opts.concurrency, json: opts.json, tag: opts.liveTag });
        return;
      }
      const tag = opts.tag!;
      const s = spinner(`forking ${n} from ${tag}`);
      let done = 0;
      const started = performance.now();
      let results: ForkRow[];
      try {
        results = await backend.fork({
          tag,
          n,
          memoryLimitMib: opts.memoryLimitMib,
          cpuLimit: opts.cpuLimit,
          network: opts.net,
          allowOut: opts.allowOut,
          denyOut: opts.denyOut,
          concurrency: opts.concurrency,
          onChild: () => {
            done++;
            s.text = `forking from ${tag}: ${done}/${n}`;
          },
        });
      } finally {
        s.stop();
      }
      const wallMs = performance.now() - started;
      const ok = results.filter((r) => r.ok);
      if (opts.json) {
        const round = (v: number | undefined) => (v === undefined ? undefined : round1(v));
        const rows = results.map((r) =>
          r.ok
            ? {
                id: r.id,
                ok: true,
                vmm_start_ms: round(r.vmm_start_ms),
                restore_ms: round(r.restore_ms),
                first_answer_ms: round(r.first_answer_ms),
                total_ms: round(r.total_ms),
              }
            : { id: r.id, ok: false, error: r.error },
        );
        process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
      } else {
        const table = plainTable(["ID", "VMM START", "RESTORE", "FIRST ANSWER (IDENTITY)", "TOTAL"]);
        for (const r of results) {
          if (r.ok)
            table.push([r.id, fmtMs(r.vmm_start_ms ?? 0), fmtMs(r.restore_ms ?? 0), fmtMs(r.first_answer_ms ?? 0), fmtMs(r.total_ms ?? 0)]);
          else
            table.push([
              r.id,
              { colSpan: 4, content: `FAILED: ${r.error?.message}${r.error?.console ? ` (console: ${r.error.console})` : ""}` },
            ]);
        }
        process.stdout.write(`${table.toString()}\n`);
        const totals = ok.map((r) => r.total_ms ?? 0);
        process.stdout.write(
          `${ok.length}/${n} children up in ${fmtMs(wallMs)}${ok.length ? ` (per child p50 ${fmtMs(percentile(totals, 50))}, p99 ${fmtMs(percentile(totals, 99))})` : ""}\n`,
        );
      }
      for (const r of results) if (!r.ok) process.stderr.write(`forkd: child ${r.id} failed: ${r.error?.message}\n`);
      if (ok.length < n) process.exitCode = 1;
    });

  program
    .command("ls")
    .description("list sandboxes (and a line per hot pool; --pool lists the pooled children too)")
    .option("--json", "machine-readable output")
    .option("--pool", "also the children waiting in hot pools (POOL column)")
    .action(async (opts: { json?: boolean; pool?: boolean }) => {
      const backend = await openBackend();
      // Both at once: one round trip to the daemon fewer before anything prints.
      const [rows, poolRows] = await Promise.all([
        backend.listSandboxes({ pool: opts.pool ?? false }),
        opts.json ? Promise.resolve([]) : backend.listPools(),
      ]);
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
        return;
      }
      const pools = poolRows.map((p) => `${p.tag} ${p.ready}/${p.size} ready${p.starting ? `, ${p.starting} starting` : ""}`);
      if (rows.length === 0) {
        process.stdout.write("no sandboxes; start some with `forkd fork --tag TAG -n N`\n");
        if (pools.length) process.stdout.write(`hot pools: ${pools.join("; ")}\n`);
        return;
      }
      const table = plainTable(["ID", "TAG", "POOL", "STATE", "HEALTH", "PID", "MEMORY", "LIMIT", "NETWORK", "CREATED"]);
      for (const r of rows) {
        table.push([
          r.id,
          r.snapshot_tag ?? "-",
          r.pool ? "pooled" : "-",
          r.state,
          r.health === "unhealthy" ? `unhealthy: ${r.health_reason ?? "broke the agent protocol"}` : "ok",
          r.pid,
          `${r.memory_mib} MiB`,
          r.memory_limit_mib ? `${r.memory_limit_mib} MiB` : "-",
          r.network,
          r.created_at,
        ]);
      }
      process.stdout.write(`${table.toString()}\n`);
      if (pools.length) process.stdout.write(`hot pools: ${pools.join("; ")}\n`);
    });

  program
    .command("exec")
    .description("run a command in a sandbox, stream its output, exit with its status")
    .argument("<id>")
    .argument("[command...]", "after --")
    .usage("[options] ID -- CMD [ARGS...]")
    .option("--env <k=v>", "environment variable (repeatable)", collect, [])
    .option("--cwd <dir>", "working directory in the guest")
    .option("--timeout-ms <n>", "kill the command after this long", parseIntOption("--timeout-ms"))
    .option("--shell", "run the command words as one /bin/sh -c string")
    .action(async (id: string, command: string[], opts: { env: string[]; cwd?: string; timeoutMs?: number; shell?: boolean }) => {
      if (command.length === 0) throw new ForkdError("bad_request", "missing command: usage is `forkd exec ID -- CMD [ARGS...]`");
      const env: Record<string, string> = {};
      for (const pair of opts.env) {
        const eq = pair.indexOf("=");
        if (eq <= 0) throw new ForkdError("bad_request", `--env wants NAME=VALUE, got '${pair}'`);
        env[pair.slice(0, eq)] = pair.slice(eq + 1);
      }
      const result = await (await openBackend()).exec(
        id,
        {
          ...(opts.shell ? { cmd: command.join(" ") } : { argv: command }),
          env,
          ...(opts.cwd ? { cwd: opts.cwd } : {}),
          ...(opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {}),
        },
        (d) => process.stdout.write(d),
        (d) => process.stderr.write(d),
      );
      if (result.timedOut) process.stderr.write(`forkd: command timed out after ${opts.timeoutMs} ms\n`);
      process.exitCode = result.exitCode ?? 137;
    });

  program
    .command("eval")
    .description("evaluate JavaScript in the sandbox's warm context (state persists between calls)")
    .argument("<id>")
    .argument("<code>")
    .option("--json", "print the whole result as JSON")
    .option("--python", "evaluate in the warm Python worker (images with Python)")
    .action(async (id: string, code: string, opts: { json?: boolean; python?: boolean }) => {
      const result = await (await openBackend()).eval(id, code, opts.python ? "python" : undefined);
      if (result.stdout && !opts.json) process.stdout.write(result.stdout);
      if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else process.stdout.write(`${typeof result.value === "string" ? result.value : JSON.stringify(result.value)}\n`);
    });

  program
    .command("files")
    .description("read, write or list files in a sandbox")
    .argument("<id>")
    .argument("<action>", "read | write | ls")
    .argument("<path>", "absolute path in the guest")
    .option("--from <file>", "for write: local file to upload (default: stdin)")
    .action(async (id: string, action: string, guestPath: string, opts: { from?: string }) => {
      if (!["read", "write", "ls"].includes(action))
        throw new ForkdError("bad_request", `files action must be read, write or ls, got '${action}'`);
      const data = action === "write" ? (opts.from ? fs.readFileSync(opts.from) : fs.readFileSync(0)) : undefined;
      const backend = await openBackend();
      if (action === "read") {
        const res = (await backend.files(id, { action: "read", path: guestPath })) as { data: string };
        process.stdout.write(Buffer.from(res.data, "base64"));
      } else if (action === "write") {
        const res = (await backend.files(id, { action: "write", path: guestPath, data })) as { size: number };
        process.stderr.write(`wrote ${res.size} bytes to ${guestPath}\n`);
      } else {
        const res = (await backend.files(id, { action: "list", path: guestPath })) as {
          entries: { name: string; type: string; size: number }[];
        };
        for (const e of res.entries)
          process.stdout.write(`${e.type === "dir" ? "d" : e.type === "symlink" ? "l" : "-"} ${String(e.size).padStart(10)} ${e.name}\n`);
      }
    });

  program
    .command("kill")
    .description("stop sandboxes: by id, all of them, or all children of a snapshot")
    .argument("[ids...]")
    .option("--all", "every sandbox")
    .option("--tag <tag>", "every child of this snapshot")
    .action(async (ids: string[], opts: { all?: boolean; tag?: string }) => {
      if (!opts.all && !opts.tag && ids.length === 0) throw new ForkdError("bad_request", "name sandbox ids, or use --all or --tag TAG");
      const backend = await openBackend();
      const all = opts.all || opts.tag ? await backend.listSandboxes() : [];
      const targets = opts.all ? all.map((s) => s.id) : opts.tag ? all.filter((s) => s.snapshot_tag === opts.tag).map((s) => s.id) : ids;
      const s = spinner(`killing ${targets.length} sandbox(es)`);
      try {
        const results = await Promise.allSettled(targets.map((id) => backend.kill(id)));
        s.stop();
        results.forEach((r, i) => {
          if (r.status === "fulfilled") process.stdout.write(`killed ${targets[i]}\n`);
          else {
            process.stderr.write(`forkd: ${(r.reason as Error).message}\n`);
            process.exitCode = 1;
          }
        });
      } finally {
        s.stop();
      }
    });

  program
    .command("cleanup")
    .description(
      "show what crashes left behind (dead sandboxes, stray runtime dirs, abandoned temp dirs, interrupted BRANCHes and starts, unowned staged images); -y removes it and resumes sources an interrupted BRANCH paused (never a live process of someone else)",
    )
    .option("-y, --yes", "remove what is found (without it, nothing is changed)")
    .option("--json", "machine-readable output")
    .action(async (opts: { yes?: boolean; json?: boolean }) => {
      const { cleanup } = await import("@forkd/core");
      const report = await cleanup({ dryRun: !opts.yes });
      if (opts.json) process.stdout.write(`${JSON.stringify({ ...report, dry_run: !opts.yes })}\n`);
      else {
        const verb = opts.yes ? "reaped" : "would reap";
        process.stdout.write(
          `${verb} ${report.reaped.length} dead sandbox(es), ${report.strayRunDirs.length} stray runtime dir(s), ${report.strayTempDirs.length} abandoned temp dir(s)${report.failedBranches.length ? `, ${report.failedBranches.length} interrupted BRANCH(es)` : ""}${report.abandonedStarts.length ? `, ${report.abandonedStarts.length} interrupted start(s)` : ""}${report.strayStaged.length ? `, ${report.strayStaged.length} unowned staged image(s) or row(s)` : ""}${report.resumedSources.length ? `; resumed ${report.resumedSources.length} source(s) an interrupted BRANCH had paused` : ""}\n`,
        );
        if (!opts.yes) process.stdout.write("nothing was changed; run `forkd cleanup -y` to remove them\n");
      }
    });
}
