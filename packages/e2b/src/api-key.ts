// The E2B SDKs send their credential as `X-API-Key: e2b_<hex>`. forkd's key is
// derived from the daemon's bearer token (an HMAC of it), so nothing new is stored,
// anyone holding the token can print the key (`forkd e2b env`), and rotating the
// token rotates the key. The key is never logged: the audit log keeps no headers.
import { createHash, createHmac, timingSafeEqual } from "node:crypto";

/** What E2B's keys look like: `e2b_` and 40 hex digits (the SDKs only pass it through). */
const KEY_HEX_CHARS = 40;
const KEY_PURPOSE = "forkd e2b api key v1";

export function e2bApiKey(daemonToken: string): string {
  return `e2b_${createHmac("sha256", daemonToken).update(KEY_PURPOSE).digest("hex").slice(0, KEY_HEX_CHARS)}`;
}

/** Constant-time, length-hiding comparison (digests compared), as the bearer check does. */
export function e2bKeyMatches(daemonToken: string, presented: string | undefined): boolean {
  return secretMatches(e2bApiKey(daemonToken), presented?.trim());
}

function secretMatches(expected: string, presented: string | undefined): boolean {
  if (presented === undefined) return false;
  const a = createHash("sha256").update(expected).digest();
  const b = createHash("sha256").update(presented).digest();
  return timingSafeEqual(a, b);
}
