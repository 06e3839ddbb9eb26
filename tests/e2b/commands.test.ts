// E2B's commands, through the unmodified `e2b` SDK, against a real daemon and real
// VMs: run (output, user, environment, cwd), CommandExitError, background with stdin
// and closeStdin, kill and signals, list, re-attach with connect (a late attach still
// gets the end), the stream deadline, output a hostile guest could send (invalid
// UTF-8, NULs, a flood), the access token, and a kill ending open streams at once.
import path from "node:path";
import { e2bApiKey } from "@forkd/e2b";
import { CommandExitError, type CommandHandle, Sandbox, TimeoutError } from "e2b";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");

let daemon: DaemonHandle;
let opts: { apiKey: string; apiUrl: string; sandboxUrl: string; requestTimeoutMs: number };
let sandbox: Sandbox;

beforeAll(async () => {
  daemon = await startDaemonProcess(env.home);
  opts = { apiKey: e2bApiKey(daemon.token), apiUrl: daemon.url, sandboxUrl: daemon.url, requestTimeoutMs: 120_000 };
  sandbox = await Sandbox.create("base", { ...opts, envs: { FROM_SANDBOX: "s", SHARED: "sandbox" }, timeoutMs: 600_000 });
}, 600_000);

afterAll(async () => {
  await sandbox?.kill().catch(() => undefined);
  if (daemon) await stopDaemon(daemon);
});

describe("commands.run", () => {
  it("returns stdout and stderr, as the user `user` in their home, with E2B's environment", async () => {
    const r = await sandbox.commands.run('echo out; echo err >&2; echo "$(whoami) $(pwd) $HOME $USER $LOGNAME"');
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe("out\nuser /home/user /home/user user user\n");
    expect(r.stderr).toBe("err\n");
    const root = await sandbox.commands.run("whoami; pwd", { user: "root" });
    expect(root.stdout).toBe("root\n/root\n");
  });

  it("layers the sandbox's envVars under the command's envs, and takes a cwd", async () => {
    const r = await sandbox.commands.run('echo "$FROM_SANDBOX $SHARED $OWN"; pwd', { envs: { SHARED: "command", OWN: "o" }, cwd: "/tmp" });
    expect(r.stdout).toBe("s command o\n/tmp\n");
    await expect(sandbox.commands.run("true", { cwd: "/no/such/dir" })).rejects.toThrow(/does not exist|no such|not found/i);
  });

  it("throws CommandExitError with the exit code, its output and envd's error text", async () => {
    const err = await sandbox.commands.run("echo partial; exit 3").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandExitError);
    const e = err as CommandExitError;
    expect(e.exitCode).toBe(3);
    expect(e.stdout).toBe("partial\n");
    expect(e.error).toBe("exit status 3");
  });

  it("reads EOF on stdin unless stdin is asked for", async () => {
    const r = await sandbox.commands.run("cat; echo done", { timeoutMs: 20_000 });
    expect(r.stdout).toBe("done\n");
  });
});

describe("background commands", () => {
  it("take stdin, then EOF with closeStdin", async () => {
    const h = await sandbox.commands.run("cat; echo closed", { background: true, stdin: true });
    await h.sendStdin("hello ");
    await sandbox.commands.sendStdin(h.pid, "world\n");
    await h.closeStdin();
    const r = await h.wait();
    expect(r.stdout).toBe("hello world\nclosed\n");
  });

  it("are listed while they run, and killed with SIGKILL (kill of an exited one is false)", async () => {
    const h = await sandbox.commands.run("sleep 600", { background: true });
    const listed = await sandbox.commands.list();
    const mine = listed.find((p) => p.pid === h.pid);
    expect(mine).toMatchObject({ cmd: "/bin/bash", args: ["-l", "-c", "sleep 600"] });
    expect(await h.kill()).toBe(true);
    const err = await h.wait().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandExitError);
    expect((err as CommandExitError).exitCode).toBe(-1);
    expect((err as CommandExitError).error).toBe("signal: killed");
    expect((await sandbox.commands.list()).some((p) => p.pid === h.pid)).toBe(false);
    expect(await sandbox.commands.kill(h.pid)).toBe(false);
  });

  it("can be re-attached with connect, which follows live output; a late attach still gets the end", async () => {
    const h = await sandbox.commands.run("for i in $(seq 1 400); do echo tick $i; sleep 0.05; done; exit 4", { background: true });
    await h.disconnect();
    let seen = "";
    const again: CommandHandle = await sandbox.commands.connect(h.pid, {
      onStdout: (d) => {
        seen += d;
      },
    });
    const deadline = Date.now() + 30_000;
    while (!/tick \d+\n/.test(seen) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(seen).toMatch(/tick \d+\n/);
    await again.disconnect();
    // Gone and back after it ended: the end still arrives.
    const short = await sandbox.commands.run("sleep 0.3; exit 5", { background: true });
    await short.disconnect();
    await new Promise((r) => setTimeout(r, 1500));
    const late = await sandbox.commands.connect(short.pid);
    const err = await late.wait().catch((e: unknown) => e);
    expect((err as CommandExitError).exitCode).toBe(5);
    await sandbox.commands.kill(h.pid);
  });

  it("a command's timeoutMs ends it: the SDK raises TimeoutError and the process is gone", async () => {
    const started = Date.now();
    const err = await sandbox.commands.run("sleep 60", { timeoutMs: 2000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TimeoutError);
    expect(Date.now() - started).toBeLessThan(20_000);
    // The guest kills it at its own deadline, which began a moment after the client's.
    let still = "?";
    for (let i = 0; i < 20 && still !== ""; i++) {
      still = (await sandbox.commands.run("pgrep -f 'sleep 6[0]' || true")).stdout.trim();
      if (still !== "") await new Promise((r) => setTimeout(r, 500));
    }
    expect(still).toBe("");
  });
});

describe("what a hostile guest can print", () => {
  it("invalid UTF-8 and NULs reach the SDK as text; a flood costs the daemon a bounded buffer, and the sandbox answers after", async () => {
    const odd = await sandbox.commands.run("printf 'a\\377\\376b\\000c'");
    expect(odd.stdout).toBe("a\uFFFD\uFFFDb\u0000c");
    // 8 MB as fast as the guest can write it: what the client has not read yet is held up
    // to 1 MiB per stream, and output past that is dropped (as forkd's own exec streams do);
    // the end still arrives with the exit code.
    const flood = await sandbox.commands.run("head -c 8000000 /dev/zero | tr '\\0' x; echo", { timeoutMs: 120_000 });
    expect(flood.exitCode).toBe(0);
    expect(flood.stdout.length).toBeGreaterThan(1024 * 1024);
    expect(flood.stdout.length).toBeLessThanOrEqual(8_000_001);
    expect(/^x*\n?$/.test(flood.stdout)).toBe(true);
    expect((await sandbox.commands.run("echo alive")).stdout).toBe("alive\n");
  });
});

describe("the envd plane's access rules", () => {
  it("refuses a call without the sandbox's access token", async () => {
    const res = await fetch(`${daemon.url}/process.Process/List`, {
      method: "POST",
      headers: { "content-type": "application/json", "e2b-sandbox-id": sandbox.sandboxId },
      body: "{}",
    });
    expect(res.status).toBe(401);
    expect(((await res.json()) as { code: string }).code).toBe("unauthenticated");
    const wrong = await fetch(`${daemon.url}/process.Process/List`, {
      method: "POST",
      headers: { "content-type": "application/json", "e2b-sandbox-id": sandbox.sandboxId, "x-access-token": "nope" },
      body: "{}",
    });
    expect(wrong.status).toBe(401);
  });
});

describe("killing the sandbox", () => {
  it("ends its open streams at once, and /health says it is gone", async () => {
    const other = await Sandbox.create("base", { ...opts, timeoutMs: 300_000 });
    expect(await other.isRunning()).toBe(true);
    const h = await other.commands.run("sleep 600", { background: true });
    const ended = h.wait().then(
      () => "resolved",
      (e: unknown) => e,
    );
    const t0 = Date.now();
    await other.kill();
    const outcome = await ended;
    expect(outcome).not.toBe("resolved");
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(await other.isRunning()).toBe(false);
  });
});
