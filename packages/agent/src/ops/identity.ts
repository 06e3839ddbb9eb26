import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import fs from "node:fs/promises";
import { createInterface } from "node:readline";
import type { IdentityRequest } from "../protocol.js";
import { AgentOpError } from "./errors.js";

export type IdentityDeps = {
  /** The helper that reseeds the CRNG and sets the clock (Node has no ioctl or clock_settime). */
  guestctl: GuestCtl;
  hostnameFile: string;
};

const HOSTNAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i;

function validateIdentity(request: IdentityRequest): { hostname: string; entropy: Buffer; clockMs: number } {
  if (typeof request.hostname !== "string" || !HOSTNAME_RE.test(request.hostname)) {
    throw new AgentOpError("bad_request", "`hostname` must be 1-63 letters, digits or '-', not starting or ending with '-'");
  }
  const entropy = Buffer.from(String(request.entropy), "base64");
  if (entropy.length < 16 || entropy.length > 512)
    throw new AgentOpError("bad_request", "`entropy` must be 16 to 512 bytes, base64-encoded");
  if (typeof request.clockMs !== "number" || !Number.isFinite(request.clockMs) || request.clockMs <= 0) {
    throw new AgentOpError("bad_request", "`clockMs` must be milliseconds since the epoch");
  }
  return { hostname: request.hostname, entropy, clockMs: Math.round(request.clockMs) };
}

/**
 * A long-lived `forkd-guestctl serve` process. The agent starts it at boot, so it
 * is part of every snapshot: a restored child asks it over a pipe instead of
 * spawning a process, which under TCG costs hundreds of milliseconds.
 */
export class GuestCtl {
  private child: ChildProcessWithoutNullStreams | undefined;
  private readonly waiting: ((line: string) => void)[] = [];
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly path: string) {}

  start(): void {
    if (this.child && this.child.exitCode === null && !this.child.killed) return;
    const child = spawn(this.path, ["serve"], { stdio: ["pipe", "pipe", "pipe"] });
    child.on("error", () => this.fail("the guest helper could not start"));
    child.on("exit", () => {
      if (this.child === child) this.child = undefined;
      this.fail("the guest helper exited");
    });
    createInterface({ input: child.stdout }).on("line", (line) => this.waiting.shift()?.(line));
    child.stderr.resume();
    this.child = child;
  }

  private fail(reason: string): void {
    for (const w of this.waiting.splice(0)) w(`err ${reason}`);
  }

  /** One request at a time: the helper answers strictly in order. */
  request(line: string): Promise<void> {
    const run = async () => {
      this.start();
      const answer = await new Promise<string>((resolve) => {
        this.waiting.push(resolve);
        this.child?.stdin.write(`${line}\n`);
      });
      if (answer !== "ok") throw new AgentOpError("io_error", `guest helper: ${answer.replace(/^err /, "")}`);
    };
    const next = this.chain.then(run, run);
    this.chain = next.catch(() => {});
    return next;
  }
}

/** Give a restored child its own hostname, RNG state and wall clock. */
export async function applyIdentity(request: IdentityRequest, deps?: IdentityDeps) {
  if (!deps) throw new AgentOpError("bad_request", "identity is only available inside a guest");
  // The common case (all three, right after a restore) is one round trip to the helper.
  if (request.hostname !== undefined && request.entropy !== undefined && request.clockMs !== undefined) {
    const { hostname, entropy, clockMs } = validateIdentity(request);
    await deps.guestctl.request(`I ${hostname} ${entropy.toString("hex")} ${clockMs}`);
    return { applied: ["hostname", "entropy", "clock"] };
  }
  const applied: string[] = [];
  if (request.hostname !== undefined) {
    if (typeof request.hostname !== "string" || !HOSTNAME_RE.test(request.hostname)) {
      throw new AgentOpError("bad_request", "`hostname` must be 1-63 letters, digits or '-', not starting or ending with '-'");
    }
    await fs.writeFile(deps.hostnameFile, request.hostname);
    applied.push("hostname");
  }
  if (request.entropy !== undefined) {
    const entropy = Buffer.from(String(request.entropy), "base64");
    if (entropy.length < 16 || entropy.length > 512) {
      throw new AgentOpError("bad_request", "`entropy` must be 16 to 512 bytes, base64-encoded");
    }
    await deps.guestctl.request(`R ${entropy.toString("hex")}`);
    applied.push("entropy");
  }
  if (request.clockMs !== undefined) {
    if (typeof request.clockMs !== "number" || !Number.isFinite(request.clockMs) || request.clockMs <= 0) {
      throw new AgentOpError("bad_request", "`clockMs` must be milliseconds since the epoch");
    }
    await deps.guestctl.request(`T ${Math.round(request.clockMs)}`);
    applied.push("clock");
  }
  return { applied };
}
