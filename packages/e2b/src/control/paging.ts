// Listing with E2B's filters and paging: newest first, `limit` per page, and an
// `X-Next-Token` that is a cursor (started-at, id) signed with a per-daemon HMAC
// key, so a client cannot forge or alter one (an altered token is a 400).
import { createHmac, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";
import { type E2bSandboxRecord, type E2bSandboxState, stateOf } from "../sandboxes.js";

const MAX_LIMIT = 100;
const STATES = ["running", "paused"] as const;

const ListQuery = z.looseObject({
  metadata: z.string().max(8192).optional(),
  state: z.union([z.string().max(64), z.array(z.string().max(64)).max(4)]).optional(),
  template: z.string().max(128).optional(),
  // ISO 8601 as each SDK writes it (Python's isoformat may carry no zone: read as UTC by Date.parse's rules).
  startedAfter: z
    .string()
    .max(64)
    .refine((s) => /^\d{4}-\d\d-\d\dT/.test(s) && Number.isFinite(Date.parse(s)), "an ISO 8601 date-time")
    .optional(),
  limit: z.coerce.number().int().min(1).max(MAX_LIMIT).optional(),
  nextToken: z.string().max(512).optional(),
});

/** Where a page ended: the last item's time and id (items are sorted newest first, then by id). */
type Cursor = { atMs: number; id: string };

function signCursor(secret: Buffer, cursor: Cursor): string {
  const payload = Buffer.from(JSON.stringify([cursor.atMs, cursor.id])).toString("base64url");
  return `${payload}.${mac(secret, payload)}`;
}

function verifyCursor(secret: Buffer, token: string): Cursor {
  const [payload, tag, extra] = token.split(".");
  const bad = () => new E2bHttpError(400, "invalid nextToken: use the X-Next-Token of the previous page unchanged");
  if (!payload || !tag || extra !== undefined) throw bad();
  const expected = Buffer.from(mac(secret, payload));
  const given = Buffer.from(tag);
  if (expected.length !== given.length || !timingSafeEqual(expected, given)) throw bad();
  const value = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as unknown;
  if (!Array.isArray(value) || typeof value[0] !== "number" || typeof value[1] !== "string") throw bad();
  return { atMs: value[0], id: value[1] };
}

function mac(secret: Buffer, payload: string): string {
  return createHmac("sha256", secret).update(payload).digest("base64url").slice(0, 32);
}

/** E2B's metadata filter: a query string `k=v&k2=v2` (each part URL-encoded once more by the SDK). */
function parseMetadataFilter(value: string | undefined): [string, string][] {
  if (!value) return [];
  return [...new URLSearchParams(value).entries()].map(([k, v]) => [safeDecode(k), safeDecode(v)]);
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new E2bHttpError(400, "invalid metadata filter: bad percent-encoding");
  }
}

function parseStates(value: string | string[] | undefined, fallback: readonly E2bSandboxState[]): E2bSandboxState[] {
  if (value === undefined) return [...fallback];
  const parts = (Array.isArray(value) ? value : [value]).flatMap((v) => v.split(",")).filter(Boolean);
  for (const p of parts)
    if (!(STATES as readonly string[]).includes(p)) throw new E2bHttpError(400, `invalid state '${p.slice(0, 20)}': running or paused`);
  return parts as E2bSandboxState[];
}

export function listPage(
  e2b: E2bContext,
  query: unknown,
  opts: { states?: E2bSandboxState[] },
): { items: E2bSandboxRecord[]; nextToken?: string } {
  const q = ListQuery.parse(query ?? {});
  const states = parseStates(q.state, opts.states ?? STATES);
  const metadata = parseMetadataFilter(q.metadata);
  const matching = e2b.sandboxes
    .list()
    .filter((r) => states.includes(stateOf(r)))
    .filter((r) => !q.template || r.templateID === q.template || r.alias === q.template)
    .filter((r) => metadata.every(([k, v]) => r.metadata[k] === v))
    .filter((r) => !q.startedAfter || r.startedAtMs > Date.parse(q.startedAfter))
    .sort((a, b) => b.startedAtMs - a.startedAtMs || a.sandboxID.localeCompare(b.sandboxID));
  return pageOf(e2b, matching, (r) => ({ atMs: r.startedAtMs, id: r.sandboxID }), q.limit, q.nextToken);
}

/** One page of `sorted` (newest first, then by id) after the token's cursor, and the token for the next. */
export function pageOf<T>(
  e2b: E2bContext,
  sorted: T[],
  cursorOf: (item: T) => Cursor,
  limit: number | undefined,
  nextToken: string | undefined,
): { items: T[]; nextToken?: string } {
  const after = nextToken ? verifyCursor(e2b.pagingSecret, nextToken) : undefined;
  const rest = after
    ? sorted.filter((item) => {
        const c = cursorOf(item);
        return c.atMs < after.atMs || (c.atMs === after.atMs && c.id.localeCompare(after.id) > 0);
      })
    : sorted;
  const items = rest.slice(0, limit ?? MAX_LIMIT);
  const last = items[items.length - 1];
  return { items, ...(rest.length > items.length && last ? { nextToken: signCursor(e2b.pagingSecret, cursorOf(last)) } : {}) };
}
