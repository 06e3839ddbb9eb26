import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { ForkdError } from "@forkd/core";

const MIN_TOKEN_BYTES = 16;

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

/**
 * A token file others on the host can read (or swap) is no secret: refused, with
 * the fix. Checked on the open descriptor, so what is checked is what is read.
 */
function checkTokenFileMode(file: string, st: fs.Stats): void {
  if ((st.mode & 0o077) !== 0) {
    throw new ForkdError(
      "unsafe_path",
      `the token file ${file} has mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}: group or others can read or change it, so anyone on this host could use the daemon's token; run: chmod 600 ${file}`,
      { path: file },
    );
  }
  const euid = process.geteuid?.() ?? 0;
  if (st.uid !== euid && st.uid !== 0) {
    throw new ForkdError(
      "unsafe_path",
      `the token file ${file} belongs to uid ${st.uid}, who could change it; it must belong to the daemon's user (uid ${euid}) or root: run: chown ${euid} ${file}`,
      { path: file },
    );
  }
}

export function readTokenFile(file: string): string {
  let text: string;
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, "r");
    checkTokenFileMode(file, fs.fstatSync(fd));
    text = fs.readFileSync(fd, "utf8");
  } catch (err) {
    if (err instanceof ForkdError) throw err;
    throw new ForkdError("bad_request", `cannot read the token file ${file}: ${(err as Error).message}`);
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
  return validateToken(text, file);
}

/** Without --token-file the daemon still requires a token: a random one, written 0600 where local clients find it. */
export function ensureLocalToken(file: string): string {
  try {
    return readTokenFile(file);
  } catch (err) {
    // A token others could read is refused, not silently replaced: they may have read it already.
    if (err instanceof ForkdError && err.code === "unsafe_path") throw err;
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
