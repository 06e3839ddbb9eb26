// envd's REST side: GET /health, and GET/POST /files (download and upload, raw or
// multipart, gzip either way). Files travel through the agent in pieces no larger
// than the sandbox's guest-payload limit, so neither side holds a whole file; parent
// directories are made for an upload and, like the file, belong to the user. A
// sandbox with an access token takes it in X-Access-Token or a signed URL
// (`signature=v1_…`, with `signature_expiration` checked), as envd does.
import { createHash } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import path from "node:path";
import { PassThrough, type Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGunzip, createGzip } from "node:zlib";
import { type AgentClient, guestPayloadLimitBytes } from "@forkd/core";
import { ConnectError, httpStatusOf } from "./connect.js";
import { checkUserName, DEFAULT_USER, type EnvdDeps, type EnvdSandbox, hasAccess, toConnectError, tokensEqual } from "./context.js";
import { boundaryOf, MultipartError, readMultipart } from "./multipart.js";

/** The largest upload taken in one request (after gzip is undone): the guest's disk, not the daemon's memory, is the bound. */
const MAX_UPLOAD_BYTES = 1024 * 1024 * 1024;
/** One piece of a file on its way through the agent (and at most the guest-payload limit). */
const PIECE_BYTES = 1024 * 1024;
/**
 * How long one piece may take: a guest starved of CPU (TCG on a loaded host) was seen
 * to need over a minute for a 1 MiB piece, and a piece given up on is cancelled, which
 * a guest that slow also answers late, and is then judged hung.
 */
const PIECE_DEADLINE_MS = 300_000;

/** envd's error body: {code: <HTTP status>, message}. */
export function sendJsonError(res: ServerResponse, status: number, message: string): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = Buffer.from(JSON.stringify({ code: status, message }), "utf8");
  res.writeHead(status, { "content-type": "application/json", "content-length": body.length });
  res.end(body);
}

/** A Connect code as the HTTP status envd's REST side answers with. */
export function restStatus(err: ConnectError): number {
  switch (err.code) {
    case "not_found":
      return 404;
    case "invalid_argument":
    case "failed_precondition":
      return 400;
    case "permission_denied":
    case "unauthenticated":
      return 401;
    case "resource_exhausted":
      return 413;
    case "unavailable":
      return 502;
    default:
      return httpStatusOf(err.code);
  }
}

/** E2B's signature of a /files URL: v1_ + base64(sha256("path:operation:user:token[:expiration]")), unpadded. */
export function fileSignature(filePath: string, operation: "read" | "write", user: string, token: string, expiration?: number): string {
  const raw =
    expiration === undefined ? `${filePath}:${operation}:${user}:${token}` : `${filePath}:${operation}:${user}:${token}:${expiration}`;
  return `v1_${createHash("sha256").update(raw).digest("base64").replace(/=+$/, "")}`;
}

type FileQuery = { path: string | undefined; username: string | undefined; signature: string | undefined; expiration: number | undefined };

function parseFileQuery(url: URL): FileQuery {
  const one = (name: string): string | undefined => {
    const all = url.searchParams.getAll(name);
    if (all.length > 1) throw new ConnectError("invalid_argument", `give \`${name}\` once`);
    return all[0];
  };
  const p = one("path");
  if (p !== undefined && (p.includes("\0") || p.length > 4096))
    throw new ConnectError("invalid_argument", "`path` must be at most 4096 characters");
  const username = one("username");
  if (username !== undefined && username !== "") checkUserName(username);
  const signature = one("signature");
  if (signature !== undefined && !/^v1_[A-Za-z0-9+/]{43}$/.test(signature)) throw new ConnectError("unauthenticated", "invalid signature");
  const exp = one("signature_expiration");
  if (exp !== undefined && !/^[0-9]{1,12}$/.test(exp))
    throw new ConnectError("invalid_argument", "`signature_expiration` must be a Unix time in seconds");
  return { path: p, username: username || undefined, signature, expiration: exp === undefined ? undefined : Number(exp) };
}

/** Whether a signed URL's signature was made with this sandbox's token (expiry is checked apart). */
function signatureMatches(q: FileQuery, operation: "read" | "write", token: string): boolean {
  if (q.signature === undefined) return false;
  return tokensEqual(fileSignature(q.path ?? "", operation, q.username ?? "", token, q.expiration), q.signature);
}

/** Access to /files: none needed without a token; else the token, or a valid unexpired signature. */
function checkFileAccess(req: IncomingMessage, sandbox: EnvdSandbox, q: FileQuery, operation: "read" | "write"): void {
  if (!sandbox.accessToken) return;
  if (req.headers["x-access-token"] !== undefined) {
    if (hasAccess(req, sandbox)) return;
    throw new ConnectError("unauthenticated", "access token present in header but does not match");
  }
  if (q.signature === undefined) throw new ConnectError("unauthenticated", "missing signature query parameter");
  if (!signatureMatches(q, operation, sandbox.accessToken)) throw new ConnectError("unauthenticated", "invalid signature");
  if (q.expiration !== undefined && q.expiration < Math.floor(Date.now() / 1000)) {
    throw new ConnectError("unauthenticated", "signature is already expired");
  }
}

/** The sandbox a signed URL is for, found by its signature (the URL names no sandbox). */
export function sandboxBySignature(deps: EnvdDeps, url: URL, operation: "read" | "write"): EnvdSandbox | undefined {
  let q: FileQuery;
  try {
    q = parseFileQuery(url);
  } catch {
    return undefined;
  }
  if (q.signature === undefined) return undefined;
  for (const sandbox of deps.securedSandboxes()) {
    if (sandbox.accessToken && signatureMatches(q, operation, sandbox.accessToken)) return sandbox;
  }
  return undefined;
}

function acceptsGzip(req: IncomingMessage): boolean {
  const value = req.headers["accept-encoding"];
  return typeof value === "string" && /(^|,)\s*gzip\s*(;\s*q=(?!0(\.0*)?\s*(,|$))[0-9.]+)?\s*(,|$)/i.test(value);
}

export async function getFile(
  req: IncomingMessage,
  res: ServerResponse,
  sandbox: EnvdSandbox,
  agent: AgentClient,
  url: URL,
): Promise<void> {
  const q = parseFileQuery(url);
  checkFileAccess(req, sandbox, q, "read");
  if (q.path === undefined || q.path === "") throw new ConnectError("invalid_argument", "`path` is required");
  const user = q.username ?? DEFAULT_USER;
  const piece = Math.min(PIECE_BYTES, guestPayloadLimitBytes(sandbox.memoryMib));
  const first = await agent
    .fs({ action: "read", path: q.path, offset: 0, length: piece, user }, { timeoutMs: PIECE_DEADLINE_MS })
    .catch((err: unknown) => {
      throw toConnectError(err);
    });
  const size = first.size;
  const name = path.basename(first.path);
  const gzip = acceptsGzip(req);
  const headers: Record<string, string | number> = {
    "content-type": "application/octet-stream",
    "content-disposition": `attachment; filename=${JSON.stringify(name.replace(/[^\x20-\x7e]/g, "_"))}`,
  };
  if (gzip) headers["content-encoding"] = "gzip";
  else headers["content-length"] = size;
  res.writeHead(200, headers);
  const body = new PassThrough();
  const sent = pipeline(gzip ? [body, createGzip(), res] : [body, res]).catch(() => undefined);
  let offset = 0;
  let data = Buffer.from(first.data, "base64");
  const aborted = new AbortController();
  res.on("close", () => {
    if (!res.writableFinished) aborted.abort();
  });
  try {
    for (;;) {
      const room = size - offset;
      // A file that grew while read is cut at the size it had; one that shrank ends the response early.
      const chunk = data.subarray(0, Math.max(0, room));
      if (chunk.length > 0 && !body.write(chunk)) await new Promise((r) => body.once("drain", r));
      offset += chunk.length;
      if (offset >= size || data.length === 0 || aborted.signal.aborted) break;
      const next = await agent.fs(
        { action: "read", path: first.path, offset, length: piece, user: "root" },
        { signal: aborted.signal, timeoutMs: PIECE_DEADLINE_MS },
      );
      data = Buffer.from(next.data, "base64");
    }
  } catch {
    res.destroy();
    return;
  }
  if (offset < size) {
    res.destroy();
    return;
  }
  body.end();
  await sent;
}

/** Read a whole stream into pieces of `piece` bytes, calling `write` for each (the first with truncate). */
async function writePieces(
  source: AsyncIterable<Buffer>,
  piece: number,
  write: (data: Buffer, append: boolean) => Promise<void>,
  budget: { left: number },
): Promise<void> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let wrote = false;
  const flush = async (all: boolean) => {
    while (pendingBytes >= piece || (all && (pendingBytes > 0 || !wrote))) {
      const joined = Buffer.concat(pending);
      const out = joined.subarray(0, Math.min(piece, joined.length));
      const rest = joined.subarray(out.length);
      pending = rest.length > 0 ? [rest] : [];
      pendingBytes = rest.length;
      await write(out, wrote);
      wrote = true;
      if (all && pendingBytes === 0) return;
    }
  };
  for await (const chunk of source) {
    budget.left -= chunk.length;
    if (budget.left < 0) throw new ConnectError("resource_exhausted", `an upload takes at most ${MAX_UPLOAD_BYTES} bytes`);
    pending.push(chunk);
    pendingBytes += chunk.length;
    if (pendingBytes >= piece) await flush(false);
  }
  await flush(true);
}

export async function postFiles(
  req: IncomingMessage,
  res: ServerResponse,
  sandbox: EnvdSandbox,
  agent: AgentClient,
  url: URL,
): Promise<void> {
  const q = parseFileQuery(url);
  checkFileAccess(req, sandbox, q, "write");
  const user = q.username ?? DEFAULT_USER;
  const encoding = (req.headers["content-encoding"] ?? "identity").toString().toLowerCase();
  if (encoding !== "identity" && encoding !== "gzip")
    throw new ConnectError("invalid_argument", `unsupported Content-Encoding '${encoding}'`);
  const source: Readable = encoding === "gzip" ? req.pipe(createGunzip()) : req;
  const contentType = (req.headers["content-type"] ?? "").toString();
  const media = contentType.split(";")[0]!.trim().toLowerCase();
  const piece = Math.min(PIECE_BYTES, guestPayloadLimitBytes(sandbox.memoryMib));
  const budget = { left: MAX_UPLOAD_BYTES };
  const written: { name: string; type: string; path: string }[] = [];
  const upload = async (target: string, body: AsyncIterable<Buffer>) => {
    let entry: { name: string; type: string; path: string } | undefined;
    await writePieces(
      body,
      piece,
      async (data, append) => {
        const r = await agent.fs(
          { action: "write", path: target, data: data.toString("base64"), append, user },
          { timeoutMs: PIECE_DEADLINE_MS },
        );
        entry = r.entry;
      },
      budget,
    );
    if (entry) written.push(entry);
  };
  try {
    if (media === "application/octet-stream") {
      if (!q.path) throw new ConnectError("invalid_argument", "path query parameter is required for raw body upload");
      await upload(q.path, source);
    } else if (media.startsWith("multipart/")) {
      const seen = new Set<string>();
      for await (const part of readMultipart(source, boundaryOf(contentType))) {
        if (part.name !== "file") {
          for await (const _ of part.body) void _;
          continue;
        }
        const target = q.path ?? part.filename;
        if (!target) throw new ConnectError("invalid_argument", "a file part needs a path (the query's or its filename)");
        if (seen.has(target))
          throw new ConnectError("invalid_argument", `you cannot upload multiple files to the same path '${target}' in one upload request`);
        seen.add(target);
        await upload(target, part.body);
      }
    } else {
      throw new ConnectError(
        "invalid_argument",
        `unsupported content type: ${contentType || "none"}, expected multipart/form-data or application/octet-stream`,
      );
    }
  } catch (err) {
    req.resume();
    if (err instanceof MultipartError) throw new ConnectError("invalid_argument", err.message);
    if ((err as { code?: string }).code === "Z_DATA_ERROR" || (err as { code?: string }).code === "Z_BUF_ERROR") {
      throw new ConnectError("invalid_argument", "error decompressing request body: not valid gzip");
    }
    throw toConnectError(err);
  }
  const body = Buffer.from(JSON.stringify(written), "utf8");
  res.writeHead(200, { "content-type": "application/json", "content-length": body.length });
  res.end(body);
}
