// The envd plane with no VM: the unmodified `e2b` SDK talks to the plane over real
// HTTP, and the plane to a real agent (AgentServer on this host, over a unix socket),
// so commands are real processes and files real files. Only the control plane's
// connect answer is a stand-in (it hands the SDK the sandbox id, envdVersion and
// access token); tests/e2b runs the same calls against a real daemon and real VMs.
// Processes run as nobody and files are handled as root here (the host has no user `user`).
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { encodeFrame, FrameDecoder } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { AgentClient } from "@forkd/core";
import { createEnvdPlane, ENVD_VERSION, type EnvdSandbox, fileSignature } from "@forkd/e2b/envd";
import { CommandExitError, FileNotFoundError, NotFoundError, Sandbox, SandboxError } from "e2b";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-envd-plane-"));
const TOKEN = "t0ken-for-the-plane-test";
const record: EnvdSandbox = { id: "iplane0test", running: true, accessToken: TOKEN, envVars: { FROM_SANDBOX: "yes" }, memoryMib: 128 };
let agentServer: net.Server;
let agent: AgentClient;
let server: http.Server;
let url: string;
let sandbox: Sandbox;
let plane: ReturnType<typeof createEnvdPlane>;
const R = { user: "root" } as const;
/** Commands run as nobody in /tmp: bash -l as root reads this host's own profile, which may be slow. */
const N = { user: "nobody", cwd: "/tmp" } as const;

beforeAll(async () => {
  const socketPath = path.join(dir, "agent.sock");
  agentServer = net.createServer((socket) => {
    const decoder = new FrameDecoder();
    const a = new AgentServer((frame) => socket.write(encodeFrame(frame)));
    socket.on("data", (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) if (f.ok) a.handle(f.message);
    });
    socket.on("error", () => {});
    socket.on("close", () => a.abortAll());
  });
  await new Promise<void>((r) => agentServer.listen(socketPath, r));
  agent = await AgentClient.connect(socketPath);
  plane = createEnvdPlane({
    sandbox: (id) => (id === record.id ? record : undefined),
    securedSandboxes: () => [record],
    agent: async () => agent,
  });
  server = http.createServer((req, res) => {
    const id = req.headers["e2b-sandbox-id"];
    if (req.url?.startsWith("/v2/sandboxes/") && id === undefined) {
      req.resume();
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ sandboxID: record.id, templateID: "base", envdVersion: ENVD_VERSION, envdAccessToken: TOKEN }));
      return;
    }
    plane.handle(req, res, typeof id === "string" ? id : undefined).catch((err: Error) => res.destroy(err));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  sandbox = await Sandbox.connect(record.id, { apiKey: "e2b_0", apiUrl: url, sandboxUrl: url });
});

afterAll(() => {
  agent?.close();
  agentServer?.close();
  server?.closeAllConnections();
  server?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("process.Process through the SDK", () => {
  it("runs a command with the sandbox's envVars under its envs, and maps a failure to CommandExitError", async () => {
    const r = await sandbox.commands.run('echo "$FROM_SANDBOX $X"; echo e >&2', { ...N, envs: { X: "1" } });
    expect(r).toMatchObject({ exitCode: 0, stdout: "yes 1\n", stderr: "e\n" });
    const err = await sandbox.commands.run("exit 7", N).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandExitError);
    expect((err as CommandExitError).error).toBe("exit status 7");
  });

  it("background: stdin, closeStdin, list, kill, connect", async () => {
    const h = await sandbox.commands.run("cat; echo eof", { ...N, background: true, stdin: true });
    await h.sendStdin("abc\n");
    await h.closeStdin();
    expect((await h.wait()).stdout).toBe("abc\neof\n");
    const s = await sandbox.commands.run("sleep 30", { ...N, background: true });
    expect((await sandbox.commands.list()).map((p) => p.pid)).toContain(s.pid);
    const again = await sandbox.commands.connect(s.pid);
    expect(await sandbox.commands.kill(s.pid)).toBe(true);
    expect(((await again.wait().catch((e: unknown) => e)) as CommandExitError).exitCode).toBe(-1);
    expect(await sandbox.commands.kill(s.pid)).toBe(false);
    await expect(sandbox.commands.connect(999_999)).rejects.toBeInstanceOf(NotFoundError);
  });

  it("refuses a call without the sandbox's access token, and a signed URL made with another token", async () => {
    const list = (headers: Record<string, string>) =>
      fetch(`${url}/process.Process/List`, {
        method: "POST",
        headers: { "content-type": "application/json", "e2b-sandbox-id": record.id, ...headers },
        body: "{}",
      });
    expect((await list({})).status).toBe(401);
    expect((await list({ "x-access-token": "wrong" })).status).toBe(401);
    expect((await list({ "x-access-token": TOKEN })).status).toBe(200);
    const forged = `${url}/files?path=%2Fetc%2Fhostname&signature=${encodeURIComponent(fileSignature("/etc/hostname", "read", "", "not-the-token"))}`;
    expect((await fetch(forged)).status).toBe(401);
  });

  it("a PTY is refused plainly", async () => {
    await expect(sandbox.pty.create({ cols: 80, rows: 24, onData: () => undefined, ...N })).rejects.toBeInstanceOf(SandboxError);
  });
});

describe("filesystem.Filesystem and /files through the SDK", () => {
  it("writes, reads (gzip too), lists, stats, moves, removes; missing is FileNotFoundError", async () => {
    const base = path.join(dir, "fs");
    await sandbox.files.write(`${base}/a/b.txt`, "hi", R);
    expect(await sandbox.files.read(`${base}/a/b.txt`, R)).toBe("hi");
    await sandbox.files.write(`${base}/z.gz.txt`, "zipped", { ...R, gzip: true });
    expect(await sandbox.files.read(`${base}/z.gz.txt`, { ...R, gzip: true })).toBe("zipped");
    expect((await sandbox.files.list(base, { ...R, depth: 2 })).map((e) => path.relative(base, e.path))).toEqual([
      "a",
      "a/b.txt",
      "z.gz.txt",
    ]);
    expect(await sandbox.files.getInfo(`${base}/a/b.txt`, R)).toMatchObject({
      type: "file",
      size: 2,
      owner: "root",
      permissions: "-rw-r--r--",
    });
    expect(await sandbox.files.makeDir(`${base}/m`, R)).toBe(true);
    expect(await sandbox.files.makeDir(`${base}/m`, R)).toBe(false);
    expect(await sandbox.files.rename(`${base}/m`, `${base}/n`, R)).toMatchObject({ name: "n", type: "dir" });
    await sandbox.files.remove(`${base}/n`, R);
    expect(await sandbox.files.exists(`${base}/n`, R)).toBe(false);
    await expect(sandbox.files.read(`${base}/missing`, R)).rejects.toBeInstanceOf(FileNotFoundError);
    await expect(sandbox.files.getInfo(`${base}/missing`, R)).rejects.toBeInstanceOf(FileNotFoundError);
  });

  it("watchDir reports a create", async () => {
    const w = path.join(dir, "watch");
    fs.mkdirSync(w);
    const names: string[] = [];
    const handle = await sandbox.files.watchDir(w, (e) => void names.push(`${e.type}:${e.name}`), R);
    fs.writeFileSync(path.join(w, "new"), "x");
    const deadline = Date.now() + 10_000;
    while (!names.includes("create:new") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await handle.stop();
    expect(names).toContain("create:new");
  });

  it("signed URLs find the sandbox by their signature; the health check follows the sandbox", async () => {
    const f = path.join(dir, "signed.txt");
    fs.writeFileSync(f, "signed");
    const res = await fetch(await sandbox.downloadUrl(f, R));
    expect(await res.text()).toBe("signed");
    expect(await sandbox.isRunning()).toBe(true);
    record.running = false;
    expect(await sandbox.isRunning()).toBe(false);
    record.running = true;
  });

  it("killing the sandbox ends its open streams at once", async () => {
    const h = await sandbox.commands.run("sleep 30", { ...N, background: true });
    const ended = h.wait().catch((e: unknown) => e);
    plane.endSandboxStreams(record.id, "the sandbox was killed");
    expect(await ended).toBeInstanceOf(Error);
    await sandbox.commands.kill(h.pid);
  });
});
