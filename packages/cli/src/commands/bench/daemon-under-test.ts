// A real daemon process in a home, run dir and staging dir of its own, for the
// fault campaign: nothing else writes there, so what is left at the end (files,
// processes, fds) is what this daemon leaked. Guest images are shared (linked in).
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError, forkdHome, settingsEnv } from "@forkd/core";
import { Controller } from "@forkd/sdk";

export type DaemonUnderTest = {
  pid: number;
  root: string;
  runDir: string;
  shmDir: string;
  socket: string;
  /** http://127.0.0.1:PORT */
  url: string;
  port: number;
  token: string;
  /** A client on the unix socket; close it before measuring the daemon's fds. */
  controller: () => Controller;
  alive: () => boolean;
  stderr: () => string;
  stop: () => Promise<void>;
};

export async function startDaemonUnderTest(opts: { prefix: string; args?: string[] }): Promise<DaemonUnderTest> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), `forkd-${opts.prefix}-`));
  const home = path.join(root, "home");
  const runDir = path.join(root, "run");
  // On shmem, as in production: live BRANCH needs it, and /dev/shm is what is measured.
  const shmDir = fs.mkdtempSync(path.join("/dev/shm", `forkd-${opts.prefix}-`));
  fs.mkdirSync(home, { mode: 0o700 });
  fs.mkdirSync(runDir, { mode: 0o700 });
  const images = path.join(forkdHome(), "images");
  if (fs.existsSync(images)) fs.symlinkSync(images, path.join(home, "images"));
  const tokenFile = path.join(root, "token");
  const token = randomBytes(24).toString("base64url");
  fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const socket = path.join(root, "forkd.sock");
  const env = settingsEnv({ home, runDir, shmDir });
  const child: ChildProcess = spawn(
    process.execPath,
    [
      process.argv[1]!,
      "daemon",
      "--socket",
      socket,
      "--listen",
      "127.0.0.1:0",
      "--token-file",
      tokenFile,
      "--audit-log",
      path.join(root, "audit.log"),
      ...(opts.args ?? []),
    ],
    { env, stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (log += d));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const clients: Controller[] = [];
  const removeAll = () => {
    fs.rmSync(root, { recursive: true, force: true });
    fs.rmSync(shmDir, { recursive: true, force: true });
  };
  const stop = async () => {
    for (const c of clients.splice(0)) await c.close().catch(() => {});
    if (child.exitCode === null && child.signalCode === null) {
      // Whatever it still runs goes with it: sandboxes are killed through it first.
      const c = new Controller({ socketPath: socket, token });
      const live = await c.listSandboxes().catch(() => []);
      for (const s of live) await c.deleteSandbox(s.id).catch(() => {});
      await c.close();
      child.kill("SIGTERM");
      await exited;
    }
    for (const pid of processesUnder([root, shmDir])) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
    }
    removeAll();
  };
  const deadline = Date.now() + 120_000;
  let port: number | undefined;
  while (port === undefined) {
    const m = /http:\/\/127\.0\.0\.1:(\d+)/.exec(log);
    if (m) port = Number(m[1]);
    else if (child.exitCode !== null || Date.now() > deadline) {
      child.kill("SIGKILL");
      await exited;
      removeAll();
      throw new ForkdError("internal", `the daemon under test did not start: ${log.trim().slice(-2000)}`);
    } else await new Promise((r) => setTimeout(r, 50));
  }
  return {
    pid: child.pid!,
    root,
    runDir,
    shmDir,
    socket,
    url: `http://127.0.0.1:${port}`,
    port,
    token,
    controller: () => {
      const c = new Controller({ socketPath: socket, token, requestTimeoutMs: 600_000 });
      clients.push(c);
      return c;
    },
    alive: () => child.exitCode === null && child.signalCode === null,
    stderr: () => log,
    stop,
  };
}

/** Processes whose command line names one of `dirs` (QEMUs, copiers, launchers), wherever they were reparented. */
export function processesUnder(dirs: string[]): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
      if (dirs.some((d) => cmdline.includes(d))) out.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

/** The children of `pid` (its direct ones: the daemon starts QEMUs, copiers and helpers itself). */
function childProcesses(pid: number): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

export type Footprint = { fds: number; processes: number; files: number; rssMib: number };

/** What the daemon holds now: open fds, processes it started (or that name its dirs), files in its run and staging dirs, RSS. */
export function footprint(d: Pick<DaemonUnderTest, "pid" | "runDir" | "shmDir" | "root">): Footprint {
  const fds = fs.readdirSync(`/proc/${d.pid}/fd`).length;
  const processes = new Set([...childProcesses(d.pid), ...processesUnder([d.runDir, d.shmDir])]);
  processes.delete(d.pid);
  const status = fs.readFileSync(`/proc/${d.pid}/status`, "utf8");
  const rssKib = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? Number.NaN);
  return { fds, processes: processes.size, files: countEntries(d.runDir) + countEntries(d.shmDir), rssMib: rssKib / 1024 };
}

function countEntries(dir: string): number {
  let n = 0;
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) {
    n++;
    if (e.isDirectory()) n += countEntries(path.join(dir, e.name));
  }
  return n;
}
