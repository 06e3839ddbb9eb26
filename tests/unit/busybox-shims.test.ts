// The base image's busybox fixes, on this host with the host's busybox-static (no VM):
// the wget applet renamed so busybox's own sh no longer runs it ahead of PATH, the
// wget wrapper turning every form of -T into a time limit instead of a segfault, and
// nohup. The HTTP servers here listen on this host's loopback only.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { busyboxShims, nohupScript, patchBusybox, WGET_APPLET, wgetScript } from "@forkd/core/guest/busybox";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const HOST_BUSYBOX = "/bin/busybox";
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-busybox-"));
const bin = path.join(dir, "bin");
const bb = path.join(dir, "busybox");
let server: http.Server;
let silent: net.Server;
let url: string;
let silentUrl: string;

/** Run a program to its end without blocking this process, whose servers it talks to. */
function run(
  file: string,
  args: string[],
  timeoutMs = 20_000,
): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(file, args, { env: { PATH: `${bin}:/usr/bin:/bin`, HOME: dir }, cwd: dir, timeout: timeoutMs });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

const sh = (script: string) => run(bb, ["sh", "-c", script]);

beforeAll(async () => {
  const help = spawnSync(HOST_BUSYBOX, ["wget", "--help"], { encoding: "utf8" });
  const { binary, wgetRenamed } = patchBusybox(fs.readFileSync(HOST_BUSYBOX), help.stdout + help.stderr);
  expect(wgetRenamed).toBe(true);
  fs.writeFileSync(bb, binary, { mode: 0o755 });
  fs.mkdirSync(bin);
  for (const shim of busyboxShims(wgetRenamed)) {
    fs.writeFileSync(path.join(bin, path.basename(shim.path)), shim.text.replaceAll("/opt/forkd/bin/busybox", bb), { mode: 0o755 });
  }
  server = http.createServer((_q, r) => r.end("page"));
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/`;
  // Accepts and never answers: what -T is for.
  silent = net.createServer(() => {});
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", () => r()));
  silentUrl = `http://127.0.0.1:${(silent.address() as net.AddressInfo).port}/`;
});

afterAll(() => {
  server?.close();
  silent?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("busybox in the base image", () => {
  it("the host's busybox crashes on wget -T, which is why any of this exists", async () => {
    const res = await run(HOST_BUSYBOX, ["wget", "-T", "5", "-q", "-O", "/dev/null", url]);
    expect(res.signal).toBe("SIGSEGV");
  });

  it("renames only the wget applet, keeping the table sorted, so sh finds wget on PATH", async () => {
    const list = spawnSync(bb, ["--list"], { encoding: "utf8" }).stdout.trim().split("\n");
    const original = spawnSync(HOST_BUSYBOX, ["--list"], { encoding: "utf8" }).stdout.trim().split("\n");
    expect(list).toEqual(original.map((a) => (a === "wget" ? WGET_APPLET : a)));
    expect([...list].sort()).toEqual(list);
    expect((await sh("command -v wget")).stdout.trim()).toBe(path.join(bin, "wget"));
    // Other applets still run inside sh as before, and the renamed one answers to its name.
    expect((await sh("command -v timeout")).stdout.trim()).toBe("timeout");
    expect((await run(bb, [WGET_APPLET, "-q", "-O", "-", url])).stdout).toBe("page");
    expect(patchBusybox(Buffer.from("no applet table here"), "").wgetRenamed).toBe(false);
    expect(patchBusybox(Buffer.from("x"), "\t-T SEC\t\tNetwork read timeout").wgetRenamed).toBe(false);
  });

  it("wget takes every form of -T, and short-option clusters and option values stay intact", async () => {
    for (const args of [
      "-q -O - URL",
      "-T 5 -q -O - URL",
      "-T5 -qO- URL",
      "-qT 5 -O - URL",
      "-qT5 -O- URL",
      "--timeout=5 -q -O - URL",
      "--timeout 5 -q --output-document - URL",
      "-T 0 -q -O - URL",
      "-q -O - -- URL",
    ]) {
      const res = await sh(`wget ${args.replace("URL", url)}`);
      expect({ args, code: res.code, out: res.stdout }).toEqual({ args, code: 0, out: "page" });
    }
    // An option value that looks like -T is a value (here, a file name), not a timeout.
    expect(await sh(`wget -q -O -T ${url} && cat ./-T`)).toMatchObject({ code: 0, stdout: "page" });
    expect(await sh("wget -T soon URL")).toMatchObject({ code: 2, stderr: "wget: invalid timeout 'soon'\n" });
  });

  it("wget -T bounds a server that never answers, with GNU wget's exit 4", async () => {
    const t0 = performance.now();
    const res = await sh(`wget -T 1 -q -O /dev/null ${silentUrl}`);
    expect(res.code).toBe(4);
    expect(res.stderr).toContain("gave up after 1 s");
    expect(performance.now() - t0).toBeLessThan(10_000);
  });

  it("nohup ignores SIGHUP, answers usage with 125 and a missing program with 127", async () => {
    expect(await sh("nohup sh -c 'echo a; kill -HUP $$; echo b'")).toMatchObject({ code: 0, stdout: "a\nb\n" });
    expect(await sh("nohup")).toMatchObject({ code: 125 });
    expect(await sh("nohup -- sh -c 'echo dashdash'")).toMatchObject({ code: 0, stdout: "dashdash\n" });
    expect((await sh("nohup /nonexistent/prog")).code).toBe(127);
    // Without the wrapper's trap the same kill ends the shell.
    expect(await sh("sh -c 'echo a; kill -HUP $$; echo b'")).toMatchObject({ stdout: "a\n" });
  });

  it("scripts are plain sh for busybox (no bash-isms), and the wrapper names the renamed applet", async () => {
    expect(wgetScript()).toContain(`$BB ${WGET_APPLET} "$@"`);
    for (const text of [nohupScript(), wgetScript()]) {
      expect(text.startsWith("#!/opt/forkd/bin/busybox sh\n")).toBe(true);
      expect(text).not.toMatch(/\[\[|\$\{[^}]*\/\/|local /);
    }
  });
});
