// The dashboard in a real browser: Debian's chromium, headless, driven by
// playwright-core (no browser download), against a real daemon with real VMs
// (128 MiB guests). Logs in, sees the tree after a fork and a live BRANCH, forks
// from a node, runs a command in a terminal, uploads and downloads a file, sees an
// unhealthy sandbox marked, kills one, and a file named like markup stays text.
// Screenshots go to test-results/screenshots (ignored), so a run leaves the checkout
// clean; FORKD_UPDATE_SCREENSHOTS=1 writes them to docs/screenshots, the README's copies.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { type Browser, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { isolateForkd, REPO_ROOT } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const TAG = "ui-warm";
const CHROMIUM = "/usr/bin/chromium";
const SHOTS = path.join(REPO_ROOT, process.env.FORKD_UPDATE_SCREENSHOTS === "1" ? "docs/screenshots" : "test-results/screenshots");
const ROGUE = fs.readFileSync(path.join(path.dirname(fileURLToPath(import.meta.url)), "../hostile/rogue-agent.mjs"), "utf8");
/** A file name a hostile guest could choose: markup with a handler that would set a flag if it ever ran. */
const HOSTILE_NAME = "<img src=x onerror=window.__pwned=1>";

let daemon: DaemonHandle;
let browser: Browser;
let page: Page;
let first: string;
let branchTag: string;
let victim: string;

type Res = { status: number; body: unknown };
async function call(method: string, route: string, body?: unknown): Promise<Res> {
  const res = await fetch(`${daemon.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${daemon.token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : undefined };
}

async function ok<T>(method: string, route: string, body?: unknown): Promise<T> {
  const res = await call(method, route, body);
  expect(res.status, JSON.stringify(res.body)).toBeLessThan(300);
  return res.body as T;
}

const sandboxIds = async () => (await ok<{ id: string }[]>("GET", "/v1/sandboxes")).map((s) => s.id);

beforeAll(async () => {
  fs.mkdirSync(SHOTS, { recursive: true });
  daemon = await startDaemonProcess(env.runDir);
  await ok("POST", "/v1/snapshots", { tag: TAG, memory_mib: 128 });
  first = (await ok<{ id: string }[]>("POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1 }))[0]!.id;
  branchTag = (await ok<{ tag: string }>("POST", `/v1/sandboxes/${first}/branch`, { mode: "live", tag: "ui-live", wait: false })).tag;
  // Turned hostile now: the rogue agent takes long to start under TCG, so it starts while the other tests run.
  victim = (await ok<{ id: string }[]>("POST", "/v1/sandboxes", { snapshot_tag: TAG, n: 1 }))[0]!.id;
  await ok("POST", `/v1/sandboxes/${victim}/files`, { action: "write", path: "/root/rogue.mjs", data: ROGUE });
  const frame = Buffer.from('{"id":1,"kind":"surprise","value":1}');
  const header = Buffer.alloc(4);
  header.writeUInt32BE(frame.length);
  const bytes = Buffer.concat([header, frame]).toString("base64");
  await ok("POST", `/v1/sandboxes/${victim}/exec`, {
    cmd: `/opt/forkd/bin/node /root/rogue.mjs raw 300 ${bytes} </dev/null >/root/rogue.log 2>&1 &`,
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  page.on("dialog", (d) => {
    d.accept().catch(() => {});
  });
}, 900_000);

afterAll(async () => {
  await browser?.close();
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  const { spawnSync } = await import("node:child_process");
  const cli = path.join(REPO_ROOT, "packages/cli/dist/main.js");
  spawnSync(process.execPath, [cli, "kill", "--all"], { stdio: "ignore" });
  spawnSync(process.execPath, [cli, "cleanup"], { stdio: "ignore" });
});

describe("the dashboard in headless chromium", () => {
  it("refuses a wrong token at the login form and logs in with the right one", async () => {
    const other = await browser.newPage();
    await other.goto(`${daemon.url}/ui`);
    await other.getByLabel("Token").fill("wrong-token-0123456789abcdef");
    await other.getByRole("button", { name: "Log in" }).click();
    await other.getByText("That token was refused.").waitFor();
    await other.getByLabel("Token").fill(daemon.token);
    await other.getByRole("button", { name: "Log in" }).click();
    await other.locator("body[data-ready=true]").waitFor();
    await other.close();
  });

  it("logs in from the #token= fragment, strips it from the address, and shows the tree after a fork and a live BRANCH", async () => {
    await page.goto(`${daemon.url}/ui#token=${encodeURIComponent(daemon.token)}`);
    await page.locator("body[data-ready=true]").waitFor();
    expect(new URL(page.url()).hash).toBe("");
    expect(await page.evaluate(() => sessionStorage.getItem("forkd-token"))).toBe(daemon.token);
    await page.locator(`[data-node="snap:${TAG}"]`).waitFor();
    await page.locator(`[data-node="sb:${first}"]`).waitFor();
    await page.locator(`[data-node="snap:${branchTag}"]`).waitFor({ timeout: 60_000 });
    // The live BRANCH is a layer on the warm snapshot: listed under it, and its info names its source.
    expect(await page.locator(`li:has(> [data-node="snap:${TAG}"]) [data-node="snap:${branchTag}"]`).count()).toBe(1);
    await page.locator(`[data-node="snap:${branchTag}"]`).click();
    const info = page.locator("#node-info");
    await info.getByText(`${first} at`).waitFor();
    await expect.poll(() => info.textContent()).toContain("live");
    await page.screenshot({ path: path.join(SHOTS, "dashboard-tree.png") });
  });

  it("forks from a node: the new child shows in the table and under its snapshot", async () => {
    const before = new Set(await sandboxIds());
    await page.locator(`[data-node="snap:${TAG}"]`).click();
    await page.getByRole("button", { name: `Fork from ${TAG}` }).click();
    await expect.poll(async () => (await sandboxIds()).filter((id) => !before.has(id)).length, { timeout: 90_000 }).toBe(1);
    const child = (await sandboxIds()).find((id) => !before.has(id))!;
    await page.locator(`tr[data-sandbox="${child}"]`).waitFor();
    await page.locator(`[data-node="sb:${child}"]`).waitFor();
  });

  it("opens a terminal on a sandbox and runs a command in it", async () => {
    await page.getByRole("button", { name: `Open a terminal on ${first}` }).click();
    await page.locator(".xterm").waitFor();
    await page.getByText(/Terminal on .* \(process \d+\)/).waitFor();
    await page.locator(".xterm-helper-textarea").focus();
    // A prompt first: the shell is on its pseudo-terminal.
    await expect.poll(() => page.locator(".xterm-rows").textContent(), { timeout: 60_000 }).toMatch(/[#$] /);
    await page.keyboard.type("echo dash-$((6*7)); tty\n");
    await expect.poll(() => page.locator(".xterm-rows").textContent(), { timeout: 60_000 }).toMatch(/dash-42[\s\S]*\/dev\/pts\/\d+/);
    await page.locator("#terminal").screenshot({ path: path.join(SHOTS, "dashboard-terminal.png") });
    await page.getByRole("button", { name: "Close terminal" }).click();
  });

  it("uploads a file into a sandbox and downloads it back", async () => {
    await page.getByRole("button", { name: `Browse the files of ${first}` }).click();
    await page.getByText(`Files of ${first}`).waitFor();
    const content = `uploaded from the browser ${Date.now()}\n`;
    await page.locator("#files-upload").setInputFiles({ name: "hello.txt", mimeType: "text/plain", buffer: Buffer.from(content) });
    await page.getByText(/uploaded hello\.txt/).waitFor();
    expect((await ok<{ data: string }>("POST", `/v1/sandboxes/${first}/files`, { action: "read", path: "/tmp/hello.txt" })).data).toBe(
      Buffer.from(content).toString("base64"),
    );
    const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: "Download hello.txt" }).click()]);
    expect(download.suggestedFilename()).toBe("hello.txt");
    expect(fs.readFileSync((await download.path())!, "utf8")).toBe(content);
  });

  it("shows a file named like markup as text: nothing it says runs", async () => {
    await ok("POST", `/v1/sandboxes/${first}/exec`, { argv: ["touch", `/tmp/${HOSTILE_NAME}`] });
    await page.getByRole("button", { name: "List" }).click();
    const cell = page.locator("td.mono", { hasText: HOSTILE_NAME });
    await cell.waitFor();
    expect(await cell.textContent()).toBe(HOSTILE_NAME);
    await page.waitForTimeout(500);
    expect(await page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned)).toBeUndefined();
    expect(await page.locator("#terminal img").count()).toBe(0);
  });

  it("marks a sandbox whose guest broke the protocol unhealthy, with its reason", async () => {
    // The rogue (started in beforeAll) took the port; its bytes reach the daemon on its next call.
    await expect
      .poll(
        async () => {
          await call("POST", `/v1/sandboxes/${victim}/ping`);
          return ((await ok<{ health: string }>("GET", `/v1/sandboxes/${victim}`)) as { health: string }).health;
        },
        { timeout: 60_000, interval: 500 },
      )
      .toBe("unhealthy");
    const row = page.locator(`tr[data-sandbox="${victim}"].unhealthy`);
    await row.waitFor({ timeout: 30_000 });
    expect(await row.textContent()).toContain("unhealthy");
    await page.locator(`li.sandbox.unhealthy [data-node="sb:${victim}"]`).waitFor();
  });

  it("kills a sandbox from the table", async () => {
    const target = (await sandboxIds()).find((id) => id !== first)!;
    await page.getByRole("button", { name: `Kill ${target}` }).click();
    await page.locator(`tr[data-sandbox="${target}"]`).waitFor({ state: "detached", timeout: 60_000 });
    expect(await sandboxIds()).not.toContain(target);
  });

  it("fits a phone's width: one column, nothing wider than the screen", async () => {
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
    await phone.goto(`${daemon.url}/ui#token=${encodeURIComponent(daemon.token)}`);
    await phone.locator("body[data-ready=true]").waitFor();
    expect(await phone.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
    await phone.screenshot({ path: path.join(SHOTS, "dashboard-phone.png"), fullPage: false });
    await phone.close();
  });
});
