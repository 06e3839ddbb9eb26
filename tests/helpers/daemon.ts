import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { CLI } from "./env.js";

export type DaemonHandle = {
  child: ChildProcess;
  url: string;
  socket: string;
  token: string;
  tokenFile: string;
  audit: string;
  stderr: () => string;
};

/** Start the real daemon as its own process on a free loopback port and a unix socket. */
export async function startDaemonProcess(dir: string, extraArgs: string[] = []): Promise<DaemonHandle> {
  const tokenFile = path.join(dir, "token.txt");
  if (!fs.existsSync(tokenFile)) fs.writeFileSync(tokenFile, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  const token = fs.readFileSync(tokenFile, "utf8").trim();
  const socket = path.join(dir, "forkd.sock");
  const audit = path.join(dir, "audit.log");
  const child = spawn(
    process.execPath,
    [CLI, "daemon", "--listen", "127.0.0.1:0", "--socket", socket, "--token-file", tokenFile, "--audit-log", audit, ...extraArgs],
    { env: process.env, stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    const m = /http:\/\/127\.0\.0\.1:(\d+)/.exec(stderr);
    if (m) return { child, url: `http://127.0.0.1:${m[1]}`, socket, token, tokenFile, audit, stderr: () => stderr };
    if (child.exitCode !== null) throw new Error(`daemon exited: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill("SIGKILL");
  throw new Error(`daemon did not start: ${stderr}`);
}

export async function stopDaemon(handle: DaemonHandle, signal: NodeJS.Signals = "SIGTERM"): Promise<number | null> {
  if (handle.child.exitCode !== null) return handle.child.exitCode;
  const exited = new Promise<number | null>((r) => handle.child.once("exit", (code) => r(code)));
  handle.child.kill(signal);
  return exited;
}
