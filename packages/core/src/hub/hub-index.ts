// forkd's hub: a plain JSON document (registry.json) served anywhere over https
// that maps OWNER/NAME to the URL of a pack and its sha256:
//   {"snapshots": {"owner/name": {"url": "https://…/x.forkd.tar.zst", "sha256": "…", "description": "…"}}}
// A relative url is relative to the index's own URL. Pulling a name downloads the
// pack (resumable, kept under FORKD_HOME/hub/blobs until it registers), checks
// its sha256 when the index gives one, and unpacks it with every member verified.
import { createHash, randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import { ForkdError, isForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";
import { blobsDir, fetchFollowing, removeDeadTemps, resumableDownload } from "./download.js";
import { type Progress, unpackFile } from "./pack.js";
import { HUB_NAME_RE, parseFetchUrl, type RefOpts } from "./reference.js";
import type { PullResult } from "./registry.js";
import { readLimited } from "./registry-client.js";

type HubEntry = { url: string; sha256?: string; description?: string };
export type HubIndex = { snapshots: Record<string, HubEntry> };

const MAX_HUB_INDEX_BYTES = 4 * 2 ** 20;
/** A pack being unpacked by process PID (left behind only when that process was killed). */
const UNPACKING_RE = /\.(\d+)-[0-9a-f]{8}\.unpacking$/;
const SHA_RE = /^[0-9a-f]{64}$/;

/** The hub index to use: --hub, else FORKD_HUB_URL. */
export function hubIndexUrl(hub: string | undefined, opts: RefOpts = {}): URL {
  const value = hub ?? setting("hubUrl");
  if (!value) {
    throw new ForkdError(
      "bad_request",
      "OWNER/NAME is looked up in a hub index, and none is set: pass --hub URL (the URL of a registry.json) or set FORKD_HUB_URL",
    );
  }
  return parseFetchUrl(value, opts, "hub index URL");
}

/** Check a hub index fetched from the network before any entry is used. */
export function validateHubIndex(value: unknown, where: string): HubIndex {
  const bad = (why: string) => new ForkdError("bad_request", `the hub index at ${where} is not usable: ${why}`);
  const index = value as HubIndex;
  if (!index || typeof index !== "object" || !index.snapshots || typeof index.snapshots !== "object" || Array.isArray(index.snapshots)) {
    throw bad('it has no "snapshots" object');
  }
  for (const [name, entry] of Object.entries(index.snapshots)) {
    if (!HUB_NAME_RE.test(name)) throw bad(`'${name.slice(0, 100)}' is not an OWNER/NAME`);
    if (!entry || typeof entry !== "object" || typeof entry.url !== "string" || entry.url.length > 4096) throw bad(`${name} has no url`);
    if (entry.sha256 !== undefined && !SHA_RE.test(String(entry.sha256))) throw bad(`${name}'s sha256 is not 64 lowercase hex digits`);
    if (entry.description !== undefined && typeof entry.description !== "string") throw bad(`${name}'s description is not a string`);
  }
  return index;
}

async function fetchHubIndex(url: URL, opts: RefOpts = {}): Promise<HubIndex> {
  const res = await fetchFollowing(url, { ...opts, what: "read the hub index", headers: { accept: "application/json" } });
  if (!res.ok) {
    await res.body?.cancel().catch(() => {});
    throw new ForkdError(
      res.status === 404 ? "not_found" : "registry_unreachable",
      `GET ${url.href} (the hub index) answered HTTP ${res.status}`,
    );
  }
  const bytes = await readLimited(res, MAX_HUB_INDEX_BYTES, `the hub index at ${url.href}`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new ForkdError("bad_request", `the hub index at ${url.href} is not JSON`);
  }
  return validateHubIndex(parsed, url.href);
}

/** Download a pack (resuming an earlier attempt), check its sha256 if known, and unpack it. */
export async function pullFromUrl(
  url: URL,
  opts: RefOpts & { sha256?: string; tag?: string; onProgress?: Progress } = {},
): Promise<PullResult> {
  const onProgress = opts.onProgress ?? (() => {});
  const key = opts.sha256 ?? createHash("sha256").update(url.href).digest("hex");
  const target = path.join(blobsDir(), `pack-${opts.sha256 ? "" : "url-"}${key}`);
  await removeDeadTemps(path.dirname(target), UNPACKING_RE);
  let total = 0;
  let done = 0;
  const got = await resumableDownload({
    target,
    keepAt: `${target}.${process.pid}-${randomBytes(4).toString("hex")}.unpacking`,
    expect: opts.sha256 ? { sha256: opts.sha256 } : {},
    what: `the pack at ${url.href}`,
    open: async (from, signal) => {
      const res = await fetchFollowing(url, {
        ...opts,
        signal,
        what: `download ${url.href}`,
        headers: { "accept-encoding": "identity", ...(from > 0 ? { range: `bytes=${from}-` } : {}) },
      });
      if (res.status === 404) {
        await res.body?.cancel().catch(() => {});
        throw new ForkdError("not_found", `GET ${url.href} answered 404: no pack there`);
      }
      if (res.status !== 200 && res.status !== 206 && res.status !== 416) {
        await res.body?.cancel().catch(() => {});
        throw new ForkdError("registry_unreachable", `GET ${url.href} answered HTTP ${res.status}`);
      }
      const length = Number(res.headers.get("content-length") ?? 0);
      done = res.status === 206 ? from : 0;
      total = done + (Number.isFinite(length) ? length : 0);
      return res;
    },
    onBytes: (n) => {
      done += n;
      onProgress(done, Math.max(total, done), "downloading");
    },
  });
  try {
    const unpacked = await unpackFile(got.file, { ...(opts.tag ? { tag: opts.tag } : {}), onProgress });
    await fsp.rm(target, { force: true });
    return { ...unpacked, source: "url", ref: url.href, downloaded_bytes: got.downloaded, transfer_bytes: got.size };
  } catch (err) {
    // A pack that was refused is no use to a retry; one that only met a taken tag or a full disk is.
    if (!isForkdError(err, "conflict") && !isForkdError(err, "over_limit")) await fsp.rm(target, { force: true });
    throw err;
  } finally {
    await fsp.rm(got.file, { force: true });
  }
}

/** OWNER/NAME from the hub index. */
export async function pullFromHub(
  name: string,
  opts: RefOpts & { hub?: string; tag?: string; onProgress?: Progress } = {},
): Promise<PullResult & { hub: string }> {
  if (!HUB_NAME_RE.test(name)) throw new ForkdError("bad_request", `'${name.slice(0, 100)}' is not OWNER/NAME`);
  const indexUrl = hubIndexUrl(opts.hub, opts);
  const index = await fetchHubIndex(indexUrl, opts);
  const entry = index.snapshots[name];
  if (!entry) {
    const names = Object.keys(index.snapshots);
    throw new ForkdError(
      "not_found",
      `no snapshot ${name} in the hub index at ${indexUrl.href} (it lists ${names.length ? names.slice(0, 10).join(", ") + (names.length > 10 ? ", …" : "") : "none"})`,
      { name },
    );
  }
  let packUrl: URL;
  try {
    packUrl = new URL(entry.url, indexUrl);
  } catch {
    throw new ForkdError("bad_request", `the hub index at ${indexUrl.href} gives ${name} a url that is not one`);
  }
  const url = parseFetchUrl(packUrl.href, opts, `pack URL of ${name}`);
  const result = await pullFromUrl(url, { ...opts, ...(entry.sha256 ? { sha256: entry.sha256 } : {}) });
  return { ...result, source: "hub", ref: name, hub: indexUrl.href };
}
