// The one pid check and the one lock file (core/src/common/pid.ts) that the
// egress namespace set-up and hub downloads share: a lock names its holder's pid,
// a live holder is waited for (or refused at once), a dead one's is taken over.
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError, isAlive, withPidLock } from "@forkd/core";
import { afterEach, describe, expect, it } from "vitest";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-pid-lock-"));
const busy = (holder: number) => new ForkdError("conflict", `held by ${holder}`, { pid: holder });

/** A real process that exits when told: the holder a lock file names. */
function sleeper(): ChildProcess & { pid: number } {
  const child = spawn("sleep", ["30"], { stdio: "ignore" });
  if (child.pid === undefined) throw new Error("sleep did not start");
  return child as ChildProcess & { pid: number };
}

async function deadPid(): Promise<number> {
  const child = sleeper();
  const pid = child.pid;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await exited;
  return pid;
}

const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) c.kill("SIGKILL");
});

describe("isAlive", () => {
  it("is true for a running process and false for an exited one, a group id or nonsense", async () => {
    expect(isAlive(process.pid)).toBe(true);
    expect(isAlive(1)).toBe(true); // init: another user's process still exists (EPERM)
    expect(isAlive(await deadPid())).toBe(false);
    for (const bad of [0, -1, -process.pid, Number.NaN, 1.5]) expect(isAlive(bad), String(bad)).toBe(false);
  });

  it("is false for a zombie: exited, but never reaped by its parent", async () => {
    // sh starts a child that exits at once, then becomes `sleep`, which never waits for it.
    const parent = spawn("sh", ["-c", "sleep 0 & echo $!; exec sleep 30"], { stdio: ["ignore", "pipe", "ignore"] });
    children.push(parent);
    const zombie = Number(await new Promise<string>((resolve) => parent.stdout!.once("data", (d: Buffer) => resolve(d.toString()))));
    const stateOf = () => {
      const stat = fs.readFileSync(`/proc/${zombie}/stat`, "utf8");
      return stat[stat.lastIndexOf(")") + 2];
    };
    const until = Date.now() + 5000;
    while (stateOf() !== "Z" && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(stateOf()).toBe("Z");
    expect(isAlive(zombie)).toBe(false);
    expect(isAlive(parent.pid!)).toBe(true);
  });
});

describe("one pid check", () => {
  it("is the only kill(pid, 0) in forkd's sources: every other module asks isAlive", () => {
    const root = path.resolve(import.meta.dirname, "../../packages");
    const probes: string[] = [];
    const walk = (d: string): void => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory() && e.name !== "node_modules" && e.name !== "dist") walk(p);
        else if (e.isFile() && /\.ts$/.test(e.name) && /\bkill\([^,()]+,\s*0\)/.test(fs.readFileSync(p, "utf8")))
          probes.push(path.relative(root, p));
      }
    };
    walk(root);
    expect(probes).toEqual(["core/src/common/pid.ts"]);
  });
});

describe("withPidLock", () => {
  it("holds a file with this pid while the work runs, and removes it after, even when the work throws", async () => {
    const lock = path.join(dir, "a.lock");
    await withPidLock(lock, { waitMs: 0, busy }, async () => {
      expect(fs.readFileSync(lock, "utf8")).toBe(String(process.pid));
      expect(fs.statSync(lock).mode & 0o777).toBe(0o600);
    });
    expect(fs.existsSync(lock)).toBe(false);
    await expect(withPidLock(lock, { waitMs: 0, busy }, async () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(fs.existsSync(lock)).toBe(false);
  });

  it("takes over the lock of a process that died, or of an unreadable pid", async () => {
    const lock = path.join(dir, "b.lock");
    for (const stale of [String(await deadPid()), "", "not-a-pid"]) {
      fs.writeFileSync(lock, stale);
      expect(await withPidLock(lock, { waitMs: 0, busy }, async () => fs.readFileSync(lock, "utf8"))).toBe(String(process.pid));
    }
  });

  it("refuses at once while another live process holds it (waitMs 0), or waits until it dies", async () => {
    const lock = path.join(dir, "c.lock");
    const holder = sleeper();
    children.push(holder);
    fs.writeFileSync(lock, String(holder.pid));
    const err = await withPidLock(lock, { waitMs: 0, busy }, async () => "ran").catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "conflict", details: { pid: holder.pid } });
    expect(fs.readFileSync(lock, "utf8")).toBe(String(holder.pid)); // a live holder's lock is left alone

    setTimeout(() => holder.kill("SIGKILL"), 200);
    const t0 = Date.now();
    expect(await withPidLock(lock, { waitMs: 10_000, busy }, async () => "ran")).toBe("ran");
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150);
  });

  it("runs two holders in one process one after the other", async () => {
    const lock = path.join(dir, "d.lock");
    const order: string[] = [];
    const hold = (name: string) =>
      withPidLock(lock, { waitMs: 0, busy }, async () => {
        order.push(`${name} in`);
        await new Promise((r) => setTimeout(r, 50));
        order.push(`${name} out`);
      });
    await Promise.all([hold("first"), hold("second")]);
    expect(order).toEqual(["first in", "first out", "second in", "second out"]);
  });
});
