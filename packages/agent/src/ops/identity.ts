import { execFile } from "node:child_process";
import fs from "node:fs/promises";
import type { IdentityRequest } from "../protocol.js";
import { AgentOpError } from "./errors.js";

export type IdentityDeps = {
  /** Path of the helper that reseeds the CRNG and sets the clock (needs ioctl / clock_settime). */
  guestctl: string;
  hostnameFile: string;
};

const HOSTNAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i;

function runHelper(file: string, args: string[], input?: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(file, args, { timeout: 5000 }, (err, _stdout, stderr) => {
      if (err) reject(new AgentOpError("io_error", `${file} ${args[0]} failed: ${stderr || err.message}`));
      else resolve();
    });
    child.stdin?.end(input);
  });
}

/** Give a restored child its own hostname, RNG state and wall clock. */
export async function applyIdentity(request: IdentityRequest, deps?: IdentityDeps) {
  if (!deps) throw new AgentOpError("bad_request", "identity is only available inside a guest");
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
    await runHelper(deps.guestctl, ["reseed"], entropy);
    applied.push("entropy");
  }
  if (request.clockMs !== undefined) {
    if (typeof request.clockMs !== "number" || !Number.isFinite(request.clockMs) || request.clockMs <= 0) {
      throw new AgentOpError("bad_request", "`clockMs` must be milliseconds since the epoch");
    }
    await runHelper(deps.guestctl, ["settime", String(Math.round(request.clockMs))]);
    applied.push("clock");
  }
  return { applied };
}
