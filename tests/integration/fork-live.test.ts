// Live fork-to-many through a real daemon with real VMs: N children of a running
// sandbox in one call see its state at the capture, the source keeps running and
// its later writes reach no child, and the capture becomes an ordinary snapshot.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Controller, type ForkdApiError, Sandbox } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join("/dev/shm", `forkd-test-live-${process.pid}`);
const TAG = "live-base";
let daemon: DaemonHandle;
let api: Controller;

async function sh(id: string, cmd: string): Promise<string> {
  return (await api.exec(id, { cmd })).stdout.trim();
}

beforeAll(async () => {
  daemon = await startDaemonProcess(env.runDir);
  api = new Controller({ url: daemon.url, token: daemon.token });
  await api.createSnapshot({ tag: TAG, memory_mib: 128, warm_eval: ["globalThis.warm = 'yes'"] });
});

afterAll(async () => {
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("live fork-to-many", () => {
  let source: string;
  let tag: string;

  it("gives N children of the running source its state at the capture; its later writes reach none", async () => {
    source = (await api.createSandboxes({ snapshot_tag: TAG, n: 1 }))[0]!.id;
    // Written since its restore: a file, some MiB of data, a JavaScript global (all in guest RAM).
    await sh(source, "echo first > /root/marker1; head -c 3000000 /dev/urandom > /root/blob; md5sum /root/blob > /root/blob.md5");
    await api.eval(source, { code: "globalThis.m1 = 'first'" });
    const res = await api.forkLive(source, { n: 3 });
    tag = res.tag;
    expect(res).toMatchObject({ source_id: source, tag: expect.stringMatching(/^live-base-live-/) });
    expect(res.sandboxes).toHaveLength(3);
    expect(res.source_pause_ms).toBeGreaterThan(0);
    expect(res.capture_ready_ms).toBeGreaterThan(0);
    expect(res.capture_ready_ms).toBeLessThan(res.total_ms);
    // At least the 3 MB blob: the pages the source wrote are what the capture copied.
    expect(res.captured_pages).toBeGreaterThan(3_000_000 / 4096);
    // The source runs on and writes again right away.
    await sh(source, "echo second > /root/marker2");
    await api.eval(source, { code: "globalThis.m2 = 'second'" });
    const ids = res.sandboxes.map((s) => s.id);
    expect(new Set(ids).size).toBe(3);
    for (const id of ids) {
      expect((await api.getSandbox(id)).snapshot_tag).toBe(tag);
      expect(await sh(id, "cat /root/marker1; test -e /root/marker2 && echo LEAK || echo clean; md5sum -c /root/blob.md5")).toBe(
        "first\nclean\n/root/blob: OK",
      );
      expect((await api.eval(id, { code: "[warm, m1, typeof m2]" })).value).toEqual(["yes", "first", "undefined"]);
      expect((await api.ping(id)).hostname).toBe(id);
    }
    const rng = await Promise.all(ids.map((id) => sh(id, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")));
    expect(new Set(rng).size).toBe(3);
    expect(await sh(source, "cat /root/marker1 /root/marker2")).toBe("first\nsecond");
    expect((await api.eval(source, { code: "[m1, m2]" })).value).toEqual(["first", "second"]);
    // A write in one child stays in it.
    await sh(ids[0]!, "echo mine > /root/child0");
    expect(await sh(ids[1]!, "test -e /root/child0 && echo LEAK || echo clean")).toBe("clean");
  });

  it("registers the capture as a snapshot (a layer on the source's) that forks like any", async () => {
    const ready = await api.waitForSnapshot(tag, { timeoutMs: 120_000 });
    expect(ready).toMatchObject({ status: "ready", branched_from: source });
    expect(await api.getSnapshot(tag)).toMatchObject({ parent: TAG, storage: "diff", mode: "live" });
    const [child] = await api.createSandboxes({ snapshot_tag: tag, n: 1 });
    expect(await sh(child!.id, "cat /root/marker1; test -e /root/marker2 && echo LEAK || echo clean; md5sum -c /root/blob.md5")).toBe(
      "first\nclean\n/root/blob: OK",
    );
    expect((await api.eval(child!.id, { code: "m1" })).value).toBe("first");
  });

  it("forks a child of a live fork live again (its memory maps its grandparent's image)", async () => {
    const [first] = (await api.forkLive(source, { n: 1 })).sandboxes;
    await sh(first!.id, "echo gen2 > /root/gen2");
    const again = await api.forkLive(first!.id, { n: 1 });
    const grandchild = again.sandboxes[0]!.id;
    expect(await sh(grandchild, "cat /root/marker1 /root/marker2 /root/gen2; md5sum -c /root/blob.md5")).toBe(
      "first\nsecond\ngen2\n/root/blob: OK",
    );
  });

  it("answers bad input with the right errors", async () => {
    const bad = async (id: string, body: Record<string, unknown>) => {
      const res = await fetch(`${daemon.url}/v1/sandboxes/${id}/fork`, {
        method: "POST",
        headers: { authorization: `Bearer ${daemon.token}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      return { status: res.status, body: (await res.json()) as { code: string } };
    };
    expect(await bad(source, { n: 0 })).toMatchObject({ status: 400, body: { code: "bad_request" } });
    expect(await bad(source, { n: 1001 })).toMatchObject({ status: 400 });
    expect(await bad(source, { n: 1, bogus: true })).toMatchObject({ status: 422 });
    expect(await bad("sb-000000000000", { n: 1 })).toMatchObject({ status: 404, body: { code: "sandbox_not_found" } });
    expect(await bad(source, { n: 1, tag })).toMatchObject({ status: 409, body: { code: "conflict" } });
    expect(await bad(source, { n: 1, tag: "../x" })).toMatchObject({ status: 400 });
  });

  it("is Sandbox.fork(n) in the SDK and `forkd fork --from-sandbox` in the CLI", async () => {
    const sandbox = await Sandbox.connect(source, { controller: api });
    await sandbox.commands.run("echo sdk > /root/sdk");
    const children = await sandbox.fork(2);
    expect(children).toHaveLength(2);
    for (const c of children) expect((await c.commands.run("cat /root/sdk")).stdout).toBe("sdk\n");
    const cli = spawnSync(process.execPath, [CLI, "fork", "--from-sandbox", source, "-n", "1", "--json"], {
      env: { ...process.env, FORKD_URL: daemon.url, FORKD_TOKEN: daemon.token },
      encoding: "utf8",
      timeout: 120_000,
    });
    expect(cli.status, cli.stderr).toBe(0);
    const out = JSON.parse(cli.stdout) as { children: { id: string; ok: boolean }[]; source_pause_ms: number };
    expect(out.children).toEqual([expect.objectContaining({ ok: true })]);
    expect(await sh(out.children[0]!.id, "cat /root/sdk")).toBe("sdk");
    const bad = await api.forkLive(source, { n: 1, tag: TAG }).catch((e: unknown) => e);
    expect((bad as ForkdApiError).status).toBe(409);
  });
});
