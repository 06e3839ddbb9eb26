import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { ForkdError } from "@forkd/core";

export const MIN_TOKEN_BYTES = 16;

const PLACEHOLDERS = ["changeme", "change-me", "password", "secret", "token", "your-token-here", "xxxxxxxx", "forkd", "example", "test"];

/** Refuse tokens that are short or obviously placeholders; the error never echoes the token. */
export function validateToken(token: string, source: string): string {
  const trimmed = token.trim();
  if (Buffer.byteLength(trimmed) < MIN_TOKEN_BYTES) {
    throw new ForkdError(
      "bad_request",
      `the token in ${source} is shorter than ${MIN_TOKEN_BYTES} bytes; generate one with: head -c 32 /dev/urandom | base64`,
    );
  }
  const lower = trimmed.toLowerCase();
  if (PLACEHOLDERS.some((p) => lower.includes(p)) || new Set(trimmed).size < 4) {
    throw new ForkdError(
      "bad_request",
      `the token in ${source} looks like a placeholder; generate a random one with: head -c 32 /dev/urandom | base64`,
    );
  }
  return trimmed;
}

export function readTokenFile(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new ForkdError("bad_request", `cannot read the token file ${file}: ${(err as Error).message}`);
  }
  return validateToken(text, file);
}

/** Without --token-file the daemon still requires a token: a random one, written 0600 where local clients find it. */
export function ensureLocalToken(file: string): string {
  try {
    return validateToken(fs.readFileSync(file, "utf8"), file);
  } catch {
    const token = randomBytes(32).toString("base64url");
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    const temp = `${file}.${randomBytes(4).toString("hex")}.tmp`;
    fs.writeFileSync(temp, `${token}\n`, { mode: 0o600 });
    fs.renameSync(temp, file);
    return token;
  }
}

/** Constant-time comparison that does not leak the length: compare digests. */
export function tokenMatches(expected: string, presented: string | undefined): boolean {
  if (presented === undefined) return false;
  const a = createHash("sha256").update(expected).digest();
  const b = createHash("sha256").update(presented).digest();
  return timingSafeEqual(a, b);
}

export function bearer(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m?.[1];
}

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}
