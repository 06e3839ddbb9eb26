// The OCI distribution API as forkd speaks it: one client per registry reference,
// authenticating on the first 401 (Bearer tokens from the challenge's realm, as
// Docker Hub, GHCR and Harbor ask, or Basic), following redirects itself so the
// Authorization header never leaves the registry's origin, and turning every
// failure into an error that names the host and the request tried.
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";
import { basicHeader, type Credentials, dockerConfigPath, parseChallenges, registryCredentials } from "./auth.js";
import { checkRedirect } from "./redirects.js";
import { plainHttpAllowed, type RefOpts, type RegistryRef } from "./reference.js";

const MAX_REDIRECTS = 5;
/** Larger than any manifest forkd writes (one layer per pack member) by far; registries cap theirs at 4 MiB. */
const MAX_MANIFEST_BYTES = 4 * 2 ** 20;
export const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";

function timeoutMs(): number {
  return setting("registryTimeoutMs");
}

/** Upload chunk size (FORKD_REGISTRY_CHUNK_MIB, default 16). */
function chunkBytes(): number {
  return Math.round(setting("registryChunkMib") * 2 ** 20);
}

export type SendOpts = {
  method?: string;
  headers?: Record<string, string>;
  body?: Buffer<ArrayBuffer>;
  /** What the request is for, in words, for error messages ("read the manifest of …"). */
  what: string;
  /** Aborts the request (and its body); without one a request may take FORKD_REGISTRY_TIMEOUT_MS to answer. */
  signal?: AbortSignal;
};

function where(url: URL): string {
  return `${url.origin}${url.pathname}`;
}

/** Why a connection failed, in words a user can act on. */
export function unreachable(err: unknown, url: URL, hint = ""): ForkdError {
  const e = err as { name?: string; message?: string; code?: string; cause?: { code?: string; message?: string } };
  const code = e?.cause?.code ?? e?.code ?? "";
  const detail = e?.cause?.message ?? e?.message ?? String(err);
  let why: string;
  if (code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "EAI_NONAME")
    why = `unknown host '${url.hostname}': the name does not resolve`;
  else if (code === "ECONNREFUSED") why = "connection refused (nothing listens there)";
  else if (code === "ECONNRESET" || code === "UND_ERR_SOCKET") why = "the connection was reset";
  else if (e?.name === "TimeoutError" || e?.name === "AbortError" || code === "UND_ERR_HEADERS_TIMEOUT")
    why = `no answer within ${timeoutMs() / 1000} s`;
  else if (/SSL|TLS|EPROTO|CERT/i.test(`${code} ${detail}`)) {
    why = `TLS failed (${detail}); a registry on plain http needs --insecure-registry ${url.host} or FORKD_INSECURE_REGISTRIES`;
  } else why = detail;
  return new ForkdError("registry_unreachable", `cannot reach ${where(url)}${hint}: ${why}`, { url: where(url) });
}

/** Read a whole (small) body, refusing more than `max` bytes. */
export async function readLimited(res: Response, max: number, what: string): Promise<Buffer> {
  const declared = Number(res.headers.get("content-length") ?? -1);
  if (declared > max) {
    await res.body?.cancel().catch(() => {});
    throw new ForkdError("too_large", `${what} is ${declared} bytes; forkd reads at most ${max}`);
  }
  const chunks: Buffer[] = [];
  let total = 0;
  if (res.body) {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      total += chunk.length;
      if (total > max) {
        await res.body.cancel().catch(() => {});
        throw new ForkdError("too_large", `${what} is more than ${max} bytes; forkd reads at most ${max}`);
      }
      chunks.push(Buffer.from(chunk));
    }
  }
  return Buffer.concat(chunks);
}

async function drain(res: Response): Promise<void> {
  await res.body?.cancel().catch(() => {});
}

/** The registry's own words about a failure (distribution's {"errors":[{code,message}]}), short. */
async function registrySays(res: Response): Promise<string> {
  const text = (await readLimited(res, 64 * 1024, "an error body").catch(() => Buffer.alloc(0))).toString("utf8");
  try {
    const body = JSON.parse(text) as { errors?: { code?: string; message?: string }[] };
    const said = (body.errors ?? []).map((e) => [e.code, e.message].filter(Boolean).join(": ")).join("; ");
    if (said) return said.slice(0, 300);
  } catch {
    // not JSON
  }
  return text.replace(/\s+/g, " ").trim().slice(0, 300);
}

export class RegistryClient {
  readonly base: URL;
  private auth: string | undefined;
  private readonly creds: Credentials | undefined;
  private readonly scope: string;

  constructor(
    readonly ref: RegistryRef,
    private readonly opts: RefOpts & { push?: boolean } = {},
  ) {
    this.base = new URL(`${ref.scheme}://${ref.apiHost}/`);
    this.creds = registryCredentials(ref.host);
    this.scope = `repository:${ref.repository}:${opts.push ? "pull,push" : "pull"}`;
  }

  private repoPath(rest: string): string {
    return `/v2/${this.ref.repository}/${rest}`;
  }

  /** fetch, following redirects by hand: the Authorization header goes only to `authOrigin`. */
  private async follow(url: URL, opts: SendOpts, authOrigin: string, auth: string | undefined): Promise<Response> {
    let method = opts.method ?? "GET";
    let body = opts.body;
    for (let hop = 0; ; hop++) {
      if (url.protocol === "http:" && !plainHttpAllowed(url.host, this.opts)) {
        throw new ForkdError(
          "registry_unreachable",
          `${opts.what}: ${this.ref.host} sent forkd to plain http ${url.origin}, which it refuses (allow it with --insecure-registry ${url.host})`,
        );
      }
      const headers: Record<string, string> = { "user-agent": "forkd/0.1", ...opts.headers };
      if (auth && url.origin === authOrigin) headers.authorization = auth;
      let res: Response;
      try {
        res = await fetch(url, {
          method,
          headers,
          ...(body ? { body } : {}),
          redirect: "manual",
          // A body gets time to travel too, at no less than 64 KiB/s.
          signal: opts.signal ?? AbortSignal.timeout(Math.ceil(timeoutMs() + ((body?.length ?? 0) / 65536) * 1000)),
        });
      } catch (err) {
        throw unreachable(err, url, ` (${opts.what})`);
      }
      const location = res.headers.get("location");
      if ([301, 302, 303, 307, 308].includes(res.status) && location && (method === "GET" || method === "HEAD" || res.status >= 307)) {
        await drain(res);
        if (hop >= MAX_REDIRECTS)
          throw new ForkdError("registry_unreachable", `${opts.what}: more than ${MAX_REDIRECTS} redirects from ${where(url)}`);
        const next = new URL(location, url);
        await checkRedirect(new URL(`https://${this.ref.host}`), next, opts.what);
        url = next;
        if (res.status === 303) {
          method = "GET";
          body = undefined;
        }
        continue;
      }
      return res;
    }
  }

  private denied(status: number, method: string, url: URL, what: string): ForkdError {
    const host = this.ref.host;
    if (status === 401 && !this.creds) {
      return new ForkdError(
        "registry_denied",
        `registry ${host} asks for credentials to ${what} (${method} ${where(url)} answered 401); log in with \`docker login ${host}\` (${dockerConfigPath()}) or set FORKD_REGISTRY_USERNAME and FORKD_REGISTRY_PASSWORD`,
        { registry: host, status },
      );
    }
    const who = this.creds ? `user '${this.creds.username}' (credentials from ${this.creds.source})` : "anonymous access";
    return new ForkdError(
      "registry_denied",
      status === 401
        ? `registry ${host} refused the credentials of ${who} to ${what} (${method} ${where(url)} answered 401)`
        : `registry ${host} denies ${who} the right to ${what} (${method} ${where(url)} answered 403)`,
      { registry: host, status },
    );
  }

  /** One request to the registry, authenticating once on a 401. */
  async send(target: string | URL, opts: SendOpts): Promise<Response> {
    const url = typeof target === "string" ? new URL(target, this.base) : target;
    const method = opts.method ?? "GET";
    for (let attempt = 0; ; attempt++) {
      const res = await this.follow(url, opts, this.base.origin, this.auth);
      if (res.status === 401 && attempt === 0) {
        const challenge = res.headers.get("www-authenticate");
        await drain(res);
        await this.authenticate(challenge, method, url, opts.what);
        continue;
      }
      if (res.status === 401 || res.status === 403) {
        await drain(res);
        throw this.denied(res.status, method, url, opts.what);
      }
      return res;
    }
  }

  private async authenticate(header: string | null, method: string, url: URL, what: string): Promise<void> {
    const challenges = parseChallenges(header);
    const bearer = challenges.find((c) => c.scheme === "bearer");
    if (bearer) {
      let realm: URL;
      try {
        realm = new URL(bearer.params.realm ?? "");
      } catch {
        throw new ForkdError("registry_unreachable", `registry ${this.ref.host} asks for a Bearer token without a usable realm`);
      }
      if (realm.protocol !== "https:" && !(realm.protocol === "http:" && plainHttpAllowed(realm.host, this.opts))) {
        throw new ForkdError(
          "registry_unreachable",
          `registry ${this.ref.host} sends forkd for tokens to ${realm.origin}, which is not https`,
        );
      }
      if (bearer.params.service) realm.searchParams.set("service", bearer.params.service);
      realm.searchParams.append("scope", this.scope);
      if (bearer.params.scope && bearer.params.scope !== this.scope) realm.searchParams.append("scope", bearer.params.scope);
      const res = await this.follow(
        realm,
        { what: `get a token from ${realm.origin} to ${what}` },
        realm.origin,
        this.creds ? basicHeader(this.creds) : undefined,
      );
      if (res.status === 401 || res.status === 403) {
        await drain(res);
        throw this.denied(res.status, "GET", new URL(realm.origin + realm.pathname), what);
      }
      if (!res.ok) {
        throw new ForkdError(
          "registry_unreachable",
          `the token service ${where(realm)} of ${this.ref.host} answered HTTP ${res.status}: ${await registrySays(res)}`,
        );
      }
      let token: unknown;
      try {
        const body = JSON.parse((await readLimited(res, 1 << 20, "a token answer")).toString("utf8")) as Record<string, unknown>;
        token = body.token ?? body.access_token;
      } catch {
        token = undefined;
      }
      if (typeof token !== "string" || !token) {
        throw new ForkdError("registry_unreachable", `the token service ${where(realm)} of ${this.ref.host} answered without a token`);
      }
      this.auth = `Bearer ${token}`;
      return;
    }
    if (challenges.length === 0 || challenges.some((c) => c.scheme === "basic")) {
      if (!this.creds) throw this.denied(401, method, url, what);
      this.auth = basicHeader(this.creds);
      return;
    }
    throw new ForkdError(
      "registry_unreachable",
      `registry ${this.ref.host} asks for ${challenges.map((c) => c.scheme).join(" or ")} authentication, which forkd does not speak (it speaks Bearer and Basic)`,
    );
  }

  /** An unexpected answer, as an error naming the request. */
  async unexpected(res: Response, method: string, url: string | URL, what: string): Promise<ForkdError> {
    const u = typeof url === "string" ? new URL(url, this.base) : url;
    return new ForkdError(
      "registry_unreachable",
      `registry ${this.ref.host} answered HTTP ${res.status} to ${method} ${where(u)} (${what}): ${(await registrySays(res)) || "no details"}`,
      { registry: this.ref.host, status: res.status },
    );
  }

  /** GET /v2/: is this a registry, can forkd reach it, and with which credentials. */
  async ping(): Promise<void> {
    const what = `talk to the registry API of ${this.ref.host}`;
    const res = await this.send("/v2/", { what });
    if (res.status === 200) {
      await drain(res);
      return;
    }
    if (res.status === 404) {
      await drain(res);
      throw new ForkdError("registry_unreachable", `${this.base.origin} is not an OCI registry (GET /v2/ answered 404)`);
    }
    throw await this.unexpected(res, "GET", "/v2/", what);
  }

  async blobExists(digest: string, size?: number): Promise<boolean> {
    const path = this.repoPath(`blobs/${digest}`);
    const what = `check for blob ${digest.slice(0, 19)}… in ${this.ref.repository}`;
    const res = await this.send(path, { method: "HEAD", what });
    await drain(res);
    if (res.status === 404) return false;
    if (res.status !== 200) throw await this.unexpected(res, "HEAD", path, what);
    const length = Number(res.headers.get("content-length") ?? -1);
    return size === undefined || length < 0 || length === size;
  }

  /** The manifest bytes as the registry holds them (their sha256 is the manifest's digest). */
  async getManifest(): Promise<{ bytes: Buffer; mediaType: string }> {
    const path = this.repoPath(`manifests/${this.ref.reference}`);
    const what = `read the manifest of ${this.ref.display}`;
    const res = await this.send(path, {
      what,
      headers: {
        accept: [OCI_MANIFEST, "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.v2+json"].join(
          ", ",
        ),
      },
    });
    if (res.status === 404) {
      const says = await registrySays(res);
      throw new ForkdError(
        "not_found",
        `no ${this.ref.digest ? "manifest" : "tag"} ${this.ref.display}: GET ${where(new URL(path, this.base))} answered 404${says ? ` (${says})` : ""}; check the repository and ${this.ref.digest ? "digest" : "tag"}`,
        { ref: this.ref.display },
      );
    }
    if (res.status !== 200) throw await this.unexpected(res, "GET", path, what);
    const bytes = await readLimited(res, MAX_MANIFEST_BYTES, `the manifest of ${this.ref.display}`);
    return { bytes, mediaType: (res.headers.get("content-type") ?? "").split(";")[0]!.trim() };
  }

  async putManifest(tag: string, bytes: Buffer<ArrayBuffer>, mediaType: string): Promise<string | undefined> {
    const path = this.repoPath(`manifests/${tag}`);
    const what = `write the manifest of ${this.ref.host}/${this.ref.repository}:${tag}`;
    const res = await this.send(path, { method: "PUT", what, headers: { "content-type": mediaType }, body: bytes });
    if (res.status !== 201 && res.status !== 200) throw await this.unexpected(res, "PUT", path, what);
    await drain(res);
    return res.headers.get("docker-content-digest") ?? undefined;
  }

  /**
   * Cross-repository mount: a blob this registry holds in `from` is linked into
   * this repository without its bytes crossing the network again. False when
   * the registry would not (then nothing was done).
   */
  async mountBlob(digest: string, from: string): Promise<boolean> {
    const url = new URL(this.repoPath("blobs/uploads/"), this.base);
    url.searchParams.set("mount", digest);
    url.searchParams.set("from", from);
    const what = `mount blob ${digest.slice(0, 19)}… from ${from} into ${this.ref.repository}`;
    const res = await this.send(url, { method: "POST", what });
    await drain(res);
    if (res.status === 201) return true;
    if (res.status === 202) {
      // The registry opened an ordinary upload instead: close it, the caller uploads.
      const location = res.headers.get("location");
      if (location) await this.send(new URL(location, this.base), { method: "DELETE", what }).then(drain, () => {});
      return false;
    }
    throw await this.unexpected(res, "POST", url, what);
  }

  /**
   * Chunked upload: POST a session, PATCH each chunk with its Content-Range
   * (following the Location each answer gives), PUT ?digest= to commit. The
   * registry checks the digest on commit.
   */
  async uploadBlob(
    digest: string,
    size: number,
    read: (offset: number, length: number) => Promise<Buffer<ArrayBuffer>>,
    onBytes: (n: number) => void = () => {},
  ): Promise<void> {
    const what = `upload blob ${digest.slice(0, 19)}… to ${this.ref.repository}`;
    const start = this.repoPath("blobs/uploads/");
    let res = await this.send(start, { method: "POST", what });
    if (res.status !== 202) throw await this.unexpected(res, "POST", start, what);
    await drain(res);
    let location = this.location(res, what);
    const chunk = chunkBytes();
    for (let offset = 0; offset < size; ) {
      const n = Math.min(chunk, size - offset);
      const body = await read(offset, n);
      res = await this.send(location, {
        method: "PATCH",
        what,
        headers: { "content-type": "application/octet-stream", "content-range": `${offset}-${offset + n - 1}` },
        body,
      });
      if (res.status !== 202) throw await this.unexpected(res, "PATCH", location, what);
      await drain(res);
      location = this.location(res, what);
      offset += n;
      onBytes(n);
    }
    const commit = new URL(location);
    commit.searchParams.set("digest", digest);
    res = await this.send(commit, { method: "PUT", what, headers: { "content-type": "application/octet-stream" } });
    if (res.status !== 201) throw await this.unexpected(res, "PUT", commit, what);
    await drain(res);
  }

  private location(res: Response, what: string): URL {
    const location = res.headers.get("location");
    if (!location) throw new ForkdError("registry_unreachable", `registry ${this.ref.host} gave no upload location (${what})`);
    return new URL(location, this.base);
  }

  /** GET a blob from `from` on (a Range request when resuming). */
  async openBlob(digest: string, from: number, signal: AbortSignal): Promise<Response> {
    const path = this.repoPath(`blobs/${digest}`);
    const what = `download blob ${digest.slice(0, 19)}… of ${this.ref.repository}`;
    const res = await this.send(path, { what, signal, ...(from > 0 ? { headers: { range: `bytes=${from}-` } } : {}) });
    if (res.status === 404) {
      await drain(res);
      throw new ForkdError(
        "not_found",
        `registry ${this.ref.host} has no blob ${digest} in ${this.ref.repository}, though its manifest names it`,
      );
    }
    if (res.status !== 200 && res.status !== 206 && res.status !== 416) throw await this.unexpected(res, "GET", path, what);
    return res;
  }

  /** A small blob (the pack index), whole, checked against its digest by the caller. */
  async getSmallBlob(digest: string, max: number): Promise<Buffer> {
    const path = this.repoPath(`blobs/${digest}`);
    const what = `download blob ${digest.slice(0, 19)}… of ${this.ref.repository}`;
    const res = await this.send(path, { what });
    if (res.status === 404) {
      await drain(res);
      throw new ForkdError(
        "not_found",
        `registry ${this.ref.host} has no blob ${digest} in ${this.ref.repository}, though its manifest names it`,
      );
    }
    if (res.status !== 200) throw await this.unexpected(res, "GET", path, what);
    return readLimited(res, max, `blob ${digest}`);
  }
}
