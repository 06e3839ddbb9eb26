// Workspaces (forkd's /v1/workspaces) and forkd's CLI names, against a real daemon
// and real VMs: a workspace survives suspend, a daemon killed -9 and resume, with
// its files; the CLI speaks forkd's commands and flags.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Controller, ForkdApiError } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = fs.mkdtempSync("/dev/shm/forkd-ws-");
const TAG = "ws-base";
let daemon: DaemonHandle;
let api: Controller;

function cli(args: string[], extraEnv: Record<string, string> = {}) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 300_000, env: { ...process.env, ...extraEnv } });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

async function sh(id: string, cmd: string): Promise<string> {
  return (await api.exec(id, { cmd })).stdout;
}

beforeAll(async () => {
  daemon = await startDaemonProcess(path.dirname(env.home));
  api = new Controller({ socketPath: daemon.socket });
  await api.createSnapshot({ tag: TAG, memory_mib: 256 });
});

afterAll(async () => {
  await api?.close();
  if (daemon) await stopDaemon(daemon);
  cli(["kill", "--all"]);
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("workspaces", () => {
  it("suspends to disk, survives a daemon killed -9, resumes with its files, twice over", async () => {
    const created = await api.createWorkspace({ name: "dev", snapshot_tag: TAG, per_child_netns: false });
    expect(created).toMatchObject({ name: "dev", status: "running", source_snapshot_tag: TAG, id: expect.stringMatching(/^ws-/) });
    const first = created.live_sandbox_id!;
    expect((await api.listSandboxes()).map((s) => s.id)).toContain(first);
    await sh(first, "echo one > /root/notes");

    const suspended = await api.suspendWorkspace("dev");
    expect(suspended).toMatchObject({ status: "suspended", current_state_tag: expect.stringMatching(/^ws-dev-/) });
    expect(suspended.live_sandbox_id).toBeUndefined();
    expect((await api.listSandboxes()).map((s) => s.id)).not.toContain(first);
    // Suspend captures through the page capture (live BRANCH): a layer of only what the sandbox wrote.
    expect(await api.getSnapshot(suspended.current_state_tag!)).toMatchObject({ mode: "live", storage: "diff", parent: TAG });

    await stopDaemon(daemon, "SIGKILL");
    daemon = await startDaemonProcess(path.dirname(env.home));
    await api.close();
    api = new Controller({ socketPath: daemon.socket });
    expect(await api.getWorkspace("dev")).toMatchObject({ status: "suspended" });

    const resumed = await api.resumeWorkspace("dev");
    expect(resumed.status).toBe("running");
    expect(await sh(resumed.live_sandbox_id!, "cat /root/notes")).toBe("one\n");
    await sh(resumed.live_sandbox_id!, "echo two >> /root/notes");
    await api.suspendWorkspace("dev", { diff: true });
    const again = await api.resumeWorkspace("dev");
    expect(await sh(again.live_sandbox_id!, "cat /root/notes")).toBe("one\ntwo\n");
    expect((await api.listWorkspaces()).map((w) => w.name)).toEqual(["dev"]);
  });

  it("answers forkd's errors: a taken name 409, suspend of a suspended one 400, an unknown one 404", async () => {
    const taken = await api.createWorkspace({ name: "dev", snapshot_tag: TAG }).catch((e: unknown) => e);
    expect(taken).toBeInstanceOf(ForkdApiError);
    expect((taken as ForkdApiError).status).toBe(409);
    await api.suspendWorkspace("dev");
    const twice = (await api.suspendWorkspace("dev").catch((e: unknown) => e)) as ForkdApiError;
    expect(twice.status).toBe(400);
    expect(twice.message).toMatch(/suspended, not running/);
    expect(((await api.getWorkspace("nope").catch((e: unknown) => e)) as ForkdApiError).status).toBe(404);
    const bad = (await api.createWorkspace({ name: "../x", snapshot_tag: TAG }).catch((e: unknown) => e)) as ForkdApiError;
    expect(bad.status).toBe(400);
  });

  it("a workspace whose sandbox died is stale, and resumes from its last state", async () => {
    const running = await api.resumeWorkspace("dev");
    const row = (await api.listSandboxes()).find((s) => s.id === running.live_sandbox_id)!;
    process.kill(row.pid, "SIGKILL");
    const deadline = Date.now() + 10_000;
    let status = "running";
    while (status !== "stale" && Date.now() < deadline) {
      status = (await api.getWorkspace("dev")).status;
      if (status !== "stale") await new Promise((r) => setTimeout(r, 100));
    }
    expect(status).toBe("stale");
    const back = await api.resumeWorkspace("dev");
    expect(await sh(back.live_sandbox_id!, "cat /root/notes")).toBe("one\ntwo\n");
  });

  it("delete kills its sandbox and removes its states, never the source snapshot", async () => {
    const before = (await api.listSnapshots()).map((s) => s.tag);
    expect(before.some((t) => t.startsWith("ws-dev-"))).toBe(true);
    await api.deleteWorkspace("dev");
    const after = (await api.listSnapshots()).map((s) => s.tag);
    expect(after.filter((t) => t.startsWith("ws-dev-"))).toEqual([]);
    expect(after).toContain(TAG);
    expect(await api.listWorkspaces()).toEqual([]);
  });
});

describe("forkd's CLI names and flags", () => {
  it("workspace commands, spawn, ping, where, snapshot --from-sandbox --live --no-wait, cleanup dry-run, --daemon-url", async () => {
    const viaUrl = ["--daemon-url", daemon.url, "--daemon-token", daemon.token];
    expect(cli([...viaUrl, "workspace", "create", "cliws", "--snapshot", TAG]).code).toBe(0);
    expect(cli([...viaUrl, "workspace", "list"]).stdout).toContain("cliws");
    const spawned = cli([...viaUrl, "spawn", "--tag", TAG, "-n", "1", "--per-child-netns", "--live-fork", "--json"]);
    expect(spawned.code, spawned.stderr).toBe(0);
    const [child] = JSON.parse(spawned.stdout) as { id: string; ok: boolean }[];
    expect(child?.ok).toBe(true);
    const pong = cli([...viaUrl, "ping", child!.id]);
    expect(JSON.parse(pong.stdout)).toMatchObject({ pong: true });
    expect(cli(["where"]).stdout.trim()).toBe(env.home);
    const branched = cli([...viaUrl, "snapshot", "--from-sandbox", child!.id, "--tag", "cli-live", "--live", "--no-wait", "--json"]);
    expect(branched.code, branched.stderr).toBe(0);
    expect(JSON.parse(branched.stdout)).toMatchObject({ tag: "cli-live", status: "writing" });
    await api.waitForSnapshot("cli-live");
    expect(cli(["snapshot", "--tag", "x", "--live"]).stderr).toMatch(/go with --from-sandbox/);
    const info = cli([...viaUrl, "snapshot-info", "cli-live", "--json"]);
    expect(JSON.parse(info.stdout)).toMatchObject({ tag: "cli-live", parent_tag: TAG, chain_depth: 1 });
    // A stray temp dir that cleanup should find: shown without -y, removed with it.
    const stray = path.join(env.home, "snapshots", ".tmp-999999-0123abcd");
    fs.mkdirSync(stray);
    const dry = cli(["cleanup", "--json"]);
    expect(JSON.parse(dry.stdout)).toMatchObject({ dry_run: true, strayTempDirs: [stray] });
    expect(fs.existsSync(stray)).toBe(true);
    expect(JSON.parse(cli(["cleanup", "-y", "--json"]).stdout).strayTempDirs).toContain(stray);
    expect(fs.existsSync(stray)).toBe(false);
    expect(cli([...viaUrl, "workspace", "delete", "cliws"]).code).toBe(0);
    expect(cli([...viaUrl, "rmi", "cli-live", "--force"]).stdout).toContain("removed cli-live");
    expect(cli([...viaUrl, "kill", child!.id]).code).toBe(0);
  });
});
