// Real QEMU, real guest kernel, real agent: no mocked VMM.
import { spawnSync } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { encodeFrame, FrameDecoder } from "@forkd/agent/protocol";
import { AgentCallError, ForkdError, Vm, waitForAgent } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();

function forkd(args: string[], opts: { timeoutMs?: number } = {}) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: opts.timeoutMs ?? 120_000, env: process.env });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

describe("a booted VM", () => {
  let vm: Vm;
  beforeAll(async () => {
    ({ vm } = await Vm.boot({ ephemeral: true }));
  });
  afterAll(async () => {
    await vm?.destroy();
  });

  it("runs the guest kernel and answers ping", async () => {
    const ping = await vm.agent.ping();
    expect(ping.version).toMatch(/^\d+\.\d+\.\d+$/);
    let out = "";
    const res = await vm.agent.exec({ argv: ["uname", "-r"] }, { onStdout: (d) => (out += d) });
    expect(res.exitCode).toBe(0);
    expect(out.trim()).toMatch(/-cloud-amd64$/);
  });

  it("runs many calls concurrently over one channel", async () => {
    const outs = await Promise.all(
      Array.from({ length: 8 }, async (_, i) => {
        let out = "";
        await vm.agent.exec({ cmd: `sleep 0.2; echo ${i}` }, { onStdout: (d) => (out += d) });
        return out.trim();
      }),
    );
    expect(outs).toEqual(["0", "1", "2", "3", "4", "5", "6", "7"]);
  });

  it("keeps JavaScript state between evals", async () => {
    await vm.agent.eval("globalThis.acc = [1, 2]");
    const res = await vm.agent.eval("acc.push(3); acc");
    expect(res.value).toEqual([1, 2, 3]);
    await expect(vm.agent.eval("nope()")).rejects.toBeInstanceOf(AgentCallError);
  });

  it("writes files into RAM over a read-only root and reads them back", async () => {
    await vm.agent.files({ action: "write", path: "/root/hello.txt", data: Buffer.from("hi there").toString("base64") });
    const read = await vm.agent.files<{ data: string }>({ action: "read", path: "/root/hello.txt" });
    expect(Buffer.from(read.data, "base64").toString()).toBe("hi there");
    let mounts = "";
    await vm.agent.exec({ argv: ["cat", "/proc/mounts"] }, { onStdout: (d) => (mounts += d) });
    expect(mounts).toMatch(/^overlay \/ overlay/m);
    let readOnly = "";
    await vm.agent.exec({ argv: ["cat", "/sys/block/vda/ro"] }, { onStdout: (d) => (readOnly += d) });
    expect(readOnly.trim()).toBe("1");
  });

  it("kills a command at its timeout and reports 127 for a missing one", async () => {
    const slow = await vm.agent.exec({ argv: ["sleep", "20"], timeoutMs: 300 });
    expect(slow.timedOut).toBe(true);
    let err = "";
    const missing = await vm.agent.exec({ argv: ["no-such-command"] }, { onStderr: (d) => (err += d) });
    expect(missing.exitCode).toBe(127);
    expect(err).toMatch(/not found/);
  });

  it("sets hostname, clock and reseeds the RNG through identity", async () => {
    const res = await vm.agent.identity({ hostname: "child-1", entropy: Buffer.alloc(64, 7).toString("base64"), clockMs: Date.now() });
    expect(res.applied).toEqual(["hostname", "entropy", "clock"]);
    expect((await vm.agent.ping()).hostname).toBe("child-1");
    let date = "";
    await vm.agent.exec({ argv: ["date", "+%s"] }, { onStdout: (d) => (date += d) });
    expect(Math.abs(Number(date.trim()) - Date.now() / 1000)).toBeLessThan(30);
  });

  it("answers malformed frames with errors and keeps serving", async () => {
    vm.agent.close();
    const socket = net.createConnection(vm.paths.agent);
    await once(socket, "connect");
    const garbage = Buffer.from("{not json", "utf8");
    const header = Buffer.alloc(4);
    header.writeUInt32BE(garbage.length);
    const decoder = new FrameDecoder();
    const frames: Record<string, unknown>[] = [];
    socket.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) if (f.ok) frames.push(f.message as Record<string, unknown>);
    });
    socket.write(Buffer.concat([header, garbage, encodeFrame({ id: 77, op: "bogus" }), encodeFrame({ id: 78, op: "ping" })]));
    const deadline = Date.now() + 20_000;
    // Answers come in completion order, not request order: wait for all three.
    const arrived = () => [77, 78].every((id) => frames.some((f) => f.id === id)) && frames.some((f) => f.code === "bad_frame");
    while (!arrived() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(frames.find((f) => f.code === "bad_frame")).toBeDefined();
    expect(frames.find((f) => f.id === 77)).toMatchObject({ kind: "error", code: "unknown_op" });
    expect(frames.find((f) => f.id === 78)).toMatchObject({ kind: "result" });
    socket.destroy();
    vm.agent = await waitForAgent(vm.paths.agent, 20_000, vm.runDir);
    expect((await vm.agent.ping()).version).toBeTruthy();
  });

  it("tears down completely", async () => {
    const runDir = vm.runDir;
    await vm.destroy();
    expect(fs.existsSync(runDir)).toBe(false);
    expect(qemuPidsUnder(runDir)).toEqual([]);
  });
});

describe("forkd run", () => {
  it("prints the guest kernel's uname line and exits with the command's status", () => {
    const res = forkd(["run", "--", "uname", "-a"]);
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/^Linux forkd .*-cloud-amd64 .*x86_64/);
    expect(forkd(["run", "--no-net", "--", "sh", "-c", "exit 5"]).code).toBe(5);
  });

  it("exits 127 with the guest's stderr for a missing command", () => {
    const res = forkd(["run", "--", "definitely-not-here"]);
    expect(res.code).toBe(127);
    expect(res.stderr).toMatch(/definitely-not-here: command not found/);
  });

  it("answers bad input with usage and the images that exist", () => {
    const missing = forkd(["run"]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/missing command/);
    const unknown = forkd(["run", "--image", "nope", "--", "true"]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/no image 'nope'; images that exist: base/);
    expect(forkd(["run", "--memory-mib", "12", "--", "true"]).stderr).toMatch(/memory must be/);
  });

  it("leaves no VM behind when the CLI is killed mid-run", async () => {
    const { spawn } = await import("node:child_process");
    const child = spawn(process.execPath, [CLI, "run", "--", "sleep", "600"], { env: process.env, stdio: "ignore" });
    // Wait until its QEMU exists, then SIGKILL the CLI: the VMM must die with it.
    const deadline = Date.now() + 30_000;
    while (qemuPidsUnder(env.runDir).length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(qemuPidsUnder(env.runDir).length).toBe(1);
    child.kill("SIGKILL");
    const gone = Date.now() + 10_000;
    while (qemuPidsUnder(env.runDir).length > 0 && Date.now() < gone) await new Promise((r) => setTimeout(r, 50));
    expect(qemuPidsUnder(env.runDir)).toEqual([]);
  });
});

describe("a guest that never answers", () => {
  it("times out naming the console log, and tears the VM down", async () => {
    const before = fs.readdirSync(`${env.runDir}/vms`);
    const err = await Vm.boot({ ephemeral: true, bootTimeoutMs: 300 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ForkdError);
    expect((err as ForkdError).code).toBe("vm_timeout");
    expect((err as ForkdError).message).toMatch(/console\.log/);
    expect(qemuPidsUnder(env.runDir)).toEqual([]);
    expect(fs.readdirSync(`${env.runDir}/vms`)).toEqual(before);
  });
});

describe("forkd image prune", () => {
  it("removes builds nothing uses and keeps the current one and those snapshots were made from", () => {
    const home = fs.mkdtempSync(path.join(env.runDir, "prune-"));
    const [current, used, unused] = ["a", "b", "c"].map((ch) => ch.repeat(64)) as [string, string, string];
    for (const digest of [current, used, unused]) fs.mkdirSync(path.join(home, "images/base", digest), { recursive: true });
    fs.writeFileSync(path.join(home, "images/base/current.json"), JSON.stringify({ name: "base", digest: current }));
    fs.mkdirSync(path.join(home, "snapshots/s1"), { recursive: true });
    fs.writeFileSync(
      path.join(home, "snapshots/s1/manifest.json"),
      JSON.stringify({ schema: 1, tag: "s1", image: { digest: used }, sizes: {}, memorySha256: "x" }),
    );
    const res = spawnSync(process.execPath, [CLI, "image", "prune", "--json"], {
      env: { ...process.env, FORKD_HOME: home },
      encoding: "utf8",
    });
    expect(res.status, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({ removed: [`base@${unused.slice(0, 12)}`], keptForSnapshots: [`base@${used.slice(0, 12)}`] });
    expect(fs.readdirSync(path.join(home, "images/base")).sort()).toEqual([current, used, "current.json"].sort());
  });
});

describe("forkd doctor", () => {
  it("reports each check and the accel mode with its reason", () => {
    const res = forkd(["doctor", "--json"]);
    const checks = JSON.parse(res.stdout) as { name: string; status: string; detail: string }[];
    const accel = checks.find((c) => c.name === "accel");
    expect(accel?.detail).toMatch(/^(kvm|tcg): /);
    expect(checks.find((c) => c.name === "qemu")?.status).toBe("pass");
    expect(res.code).toBe(checks.some((c) => c.status === "fail") ? 1 : 0);
  });
});
