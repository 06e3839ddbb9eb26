// E2B's control plane driven by the unmodified `e2b` npm SDK (pinned in
// devDependencies) against a real daemon: its environment from `forkd e2b env`,
// the `base` template built on first use, lifecycle, list filters and paging,
// time limits, pause/resume keeping a running process, fork with count, snapshots,
// metrics, and the SDK's error classes. One daemon for the file.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AuthenticationError, RateLimitError, Sandbox, SandboxError, SandboxNotFoundError } from "e2b";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

let daemon: DaemonHandle;
let env: { E2B_API_URL: string; E2B_SANDBOX_URL: string; E2B_API_KEY: string };
let main: Sandbox;
const saved: Record<string, string | undefined> = {};
const MAX_SANDBOXES = 6;

/** forkd's own API on the same daemon (the bearer token): what E2B's SDK cannot see. */
async function forkdApi<T>(method: string, route: string, body?: unknown): Promise<T> {
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${daemon.token}`, ...(body ? { "content-type": "application/json" } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${await res.text()}`);
  return (await res.json()) as T;
}

async function forkdIdOf(sandboxId: string): Promise<string> {
  const detail = await fetch(`${env.E2B_API_URL}/sandboxes/${sandboxId}`, { headers: { "x-api-key": env.E2B_API_KEY } });
  return ((await detail.json()) as { forkdSandboxID: string }).forkdSandboxID;
}

beforeAll(async () => {
  const { home } = isolateForkd();
  daemon = await startDaemonProcess(home, ["--max-sandboxes", String(MAX_SANDBOXES)]);
  const cliEnv = { ...process.env, FORKD_URL: daemon.url, FORKD_TOKEN: daemon.token };
  env = JSON.parse(execFileSync(process.execPath, [CLI, "e2b", "env", "--json"], { env: cliEnv, encoding: "utf8" }));
  // What a user runs: eval "$(forkd e2b env)" in sh, then unmodified code sees the variables.
  const fromSh = execFileSync(
    "sh",
    ["-c", `eval "$("${process.execPath}" "${CLI}" e2b env)"; printf '%s %s %s' "$E2B_API_URL" "$E2B_SANDBOX_URL" "$E2B_API_KEY"`],
    {
      env: cliEnv,
      encoding: "utf8",
    },
  );
  expect(fromSh).toBe(`${env.E2B_API_URL} ${env.E2B_SANDBOX_URL} ${env.E2B_API_KEY}`);
  for (const [k, v] of Object.entries(env)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  // The first create builds the `base` template (one boot of the prebuilt debian image): a long first request.
  main = await Sandbox.create("base", { timeoutMs: 600_000, metadata: { suite: "control", group: "a" }, requestTimeoutMs: 300_000 });
}, 400_000);

afterAll(async () => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  if (process.env.E2B_TEST_DEBUG) console.log(daemon?.stderr());
  if (daemon) await stopDaemon(daemon);
});

describe("forkd e2b env and the base template", () => {
  it("prints the daemon's URL for both planes and a key shaped like E2B's", () => {
    expect(env.E2B_API_URL).toBe(daemon.url);
    expect(env.E2B_SANDBOX_URL).toBe(daemon.url);
    expect(env.E2B_API_KEY).toMatch(/^e2b_[0-9a-f]{40}$/);
    expect(daemon.stderr()).not.toContain(env.E2B_API_KEY);
    expect(fs.readFileSync(daemon.audit, "utf8")).not.toContain(env.E2B_API_KEY);
  });

  it("built `base` on first use, saying so in the daemon's log", async () => {
    expect(daemon.stderr()).toMatch(/building the template 'base' on first use/);
    expect(daemon.stderr()).toMatch(/template 'base' ready in/);
    const info = await main.getInfo();
    expect(info).toMatchObject({ sandboxId: main.sandboxId, templateId: "e2b-base", name: "base", state: "running" });
    expect(info.metadata).toEqual({ suite: "control", group: "a" });
    expect(info.endAt.getTime() - info.startedAt.getTime()).toBe(600_000);
  });
});

describe("lifecycle, list filters and paging", () => {
  it("lists by metadata and state, pages with X-Next-Token, and kills", async () => {
    const b1 = await Sandbox.create("base", { metadata: { suite: "control", group: "b" } });
    const b2 = await Sandbox.create("base", { metadata: { suite: "control", group: "b" } });
    const groupB = await Sandbox.list({ query: { metadata: { group: "b" } } }).nextItems();
    expect(groupB.map((s) => s.sandboxId).sort()).toEqual([b1.sandboxId, b2.sandboxId].sort());
    expect(await Sandbox.list({ query: { state: ["paused"] } }).nextItems()).toEqual([]);
    expect((await Sandbox.list({ query: { metadata: { group: "nope" } } }).nextItems()).length).toBe(0);

    const pager = Sandbox.list({ limit: 1, query: { metadata: { suite: "control" } } });
    const seen: string[] = [];
    while (pager.hasNext) {
      const page = await pager.nextItems();
      expect(page.length).toBeLessThanOrEqual(1);
      seen.push(...page.map((s) => s.sandboxId));
    }
    expect(seen.sort()).toEqual([main.sandboxId, b1.sandboxId, b2.sandboxId].sort());

    // A paging token is the daemon's to write: altered by one character, it is refused.
    const first = await fetch(`${env.E2B_API_URL}/v2/sandboxes?limit=1`, { headers: { "x-api-key": env.E2B_API_KEY } });
    const token = first.headers.get("x-next-token")!;
    expect(token).toBeTruthy();
    const forged = `${token.slice(0, 2)}${token[2] === "A" ? "B" : "A"}${token.slice(3)}`;
    const refused = await fetch(`${env.E2B_API_URL}/v2/sandboxes?limit=1&nextToken=${encodeURIComponent(forged)}`, {
      headers: { "x-api-key": env.E2B_API_KEY },
    });
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { code: number }).code).toBe(400);

    expect(await Sandbox.kill(b1.sandboxId)).toBe(true);
    await b2.kill();
    expect(await Sandbox.kill(b1.sandboxId)).toBe(false);
    await expect(Sandbox.getInfo(b1.sandboxId)).rejects.toBeInstanceOf(SandboxNotFoundError);
  });
});

describe("time limits", () => {
  it("kills a sandbox at its deadline; setTimeout moves the deadline", async () => {
    const short = await Sandbox.create("base", { timeoutMs: 2_000 });
    const extended = await Sandbox.create("base", { timeoutMs: 2_000 });
    await extended.setTimeout(120_000);
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      try {
        await Sandbox.getInfo(short.sandboxId);
      } catch (err) {
        expect(err).toBeInstanceOf(SandboxNotFoundError);
        break;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
    await expect(Sandbox.getInfo(short.sandboxId)).rejects.toBeInstanceOf(SandboxNotFoundError);
    expect((await extended.getInfo()).state).toBe("running");
    await extended.kill();
  });
});

describe("pause and resume", () => {
  it("keeps a running process across pause and resume (memory kept); a second pause is a no-op", async () => {
    const sbx = await Sandbox.create("base", { metadata: { suite: "pause" } });
    const before = await forkdIdOf(sbx.sandboxId);
    const started = await forkdApi<{ pid: number }>("POST", `/v1/sandboxes/${before}/exec`, {
      cmd: "sleep 600",
      background: true,
    });
    expect(await sbx.pause()).toBe(true);
    // The SDK reads a 409 as "already paused".
    expect(await Sandbox.pause(sbx.sandboxId)).toBe(false);
    expect((await sbx.getInfo()).state).toBe("paused");
    expect((await Sandbox.list({ query: { state: ["paused"] } }).nextItems()).map((s) => s.sandboxId)).toEqual([sbx.sandboxId]);

    const resumed = await Sandbox.connect(sbx.sandboxId);
    expect(resumed.sandboxId).toBe(sbx.sandboxId);
    expect((await sbx.getInfo()).state).toBe("running");
    const after = await forkdIdOf(sbx.sandboxId);
    expect(after).not.toBe(before);
    const processes = await forkdApi<{ pid: number; running: boolean }[]>("GET", `/v1/sandboxes/${after}/processes`);
    expect(processes.find((p) => p.pid === started.pid)?.running).toBe(true);
    await sbx.kill();
  });
});

describe("fork, snapshots, metrics", () => {
  it("forks count children of a running sandbox, each a sandbox of its own", async () => {
    const children = await main.fork({ count: 3, timeoutMs: 120_000 });
    expect(children).toHaveLength(3);
    for (const child of children) {
      expect(child).toBeInstanceOf(Sandbox);
      const info = await (child as Sandbox).getInfo();
      expect(info).toMatchObject({ state: "running", templateId: "e2b-base", metadata: { suite: "control", group: "a" } });
    }
    expect(new Set(children.map((c) => (c as Sandbox).sandboxId)).size).toBe(3);
    for (const child of children) await (child as Sandbox).kill();
  });

  it("refuses more sandboxes than the daemon admits with E2B's 429 (RateLimitError), keeping none", async () => {
    const before = (await Sandbox.list().nextItems()).length;
    await expect(main.fork({ count: MAX_SANDBOXES + 2, requestTimeoutMs: 3_000 })).rejects.toBeInstanceOf(RateLimitError);
    expect((await Sandbox.list().nextItems()).length).toBe(before);
  });

  it("snapshots a sandbox into a template, lists it, creates from it, deletes it", async () => {
    const { snapshotId } = await main.createSnapshot();
    const listed = await Sandbox.listSnapshots({ sandboxId: main.sandboxId }).nextItems();
    expect(listed.map((s) => s.snapshotId)).toContain(snapshotId);
    const fromSnapshot = await Sandbox.create(snapshotId);
    expect((await fromSnapshot.getInfo()).templateId).toBe(snapshotId);
    await fromSnapshot.kill();
    expect(await Sandbox.deleteSnapshot(snapshotId)).toBe(true);
    expect(await Sandbox.deleteSnapshot(snapshotId)).toBe(false);
    expect((await Sandbox.listSnapshots({ sandboxId: main.sandboxId }).nextItems()).map((s) => s.snapshotId)).not.toContain(snapshotId);
  });

  it("reports metrics from the guest and the host", async () => {
    const metrics = await main.getMetrics();
    expect(metrics).toHaveLength(1);
    const m = metrics[0]!;
    expect(m.cpuCount).toBeGreaterThanOrEqual(1);
    expect(m.memTotal).toBeGreaterThan(100 * 2 ** 20);
    expect(m.memUsed).toBeGreaterThan(0);
    expect(m.diskTotal).toBeGreaterThan(0);
    expect(m.cpuUsedPct).toBeGreaterThanOrEqual(0);
  });
});

describe("the SDK's error classes", () => {
  it("AuthenticationError, SandboxNotFoundError, and a 404 for an unknown template", async () => {
    await expect(Sandbox.list({ apiKey: `e2b_${"0".repeat(40)}` }).nextItems()).rejects.toBeInstanceOf(AuthenticationError);
    await expect(Sandbox.getInfo("inope")).rejects.toBeInstanceOf(SandboxNotFoundError);
    await expect(Sandbox.setTimeout("inope", 1000)).rejects.toBeInstanceOf(SandboxNotFoundError);
    await expect(Sandbox.connect("inope")).rejects.toBeInstanceOf(SandboxNotFoundError);
    const unknown = await Sandbox.create("no-such-template").catch((e: unknown) => e);
    expect(unknown).toBeInstanceOf(SandboxError);
    expect((unknown as SandboxError & { statusCode?: number }).statusCode).toBe(404);
  });

  it("keeps the key out of the audit log", () => {
    expect(fs.readFileSync(path.join(daemon.audit), "utf8")).not.toContain(env.E2B_API_KEY);
  });
});
