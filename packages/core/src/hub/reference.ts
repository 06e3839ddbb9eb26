// What `forkd pull` and `forkd push` are given, parsed before any traffic: an OCI
// registry reference (HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]), a hub name
// (OWNER/NAME, looked up in a hub index) or the URL of a pack. The three look
// alike, so the rule is strict and stated in every error: a registry reference
// starts with a host (it has a dot or a port, or is localhost), a hub name is
// exactly two plain words, and a URL has its scheme.
import { ForkdError } from "../common/errors.js";
import { setting } from "../common/settings.js";

export type RegistryRef = {
  kind: "registry";
  /** The host as the user wrote it (with its port): what credentials are looked up under. */
  host: string;
  /** Where the API lives (Docker Hub's API is not at docker.io). */
  apiHost: string;
  repository: string;
  tag?: string;
  digest?: string;
  /** The tag or the digest: what /v2/<repository>/manifests/ is asked for. */
  reference: string;
  scheme: "http" | "https";
  /** For messages: host/repository:tag or @digest, as parsed. */
  display: string;
};
type HubRef = { kind: "hub"; name: string };
type UrlRef = { kind: "url"; url: URL };
export type PullSource = RegistryRef | HubRef | UrlRef;

export type RefOpts = {
  /** Hosts (HOST or HOST:PORT) allowed over plain http besides loopback; FORKD_INSECURE_REGISTRIES adds to them. */
  insecureRegistries?: string[];
};

const LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
const HOST_RE = new RegExp(`^(?:${LABEL}(?:\\.${LABEL})*|\\[[0-9A-Fa-f:.]+\\])(?::([0-9]{1,5}))?$`);
/** The distribution spec's repository grammar. */
const COMPONENT = "[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*";
const REPOSITORY_RE = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`);
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const DIGEST_REF_RE = /^sha256:[0-9a-f]{64}$/;
/** Hub names: OWNER/NAME, each a plain word. */
export const HUB_NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}\/[a-z0-9][a-z0-9_.-]{0,63}$/;

const FORMS =
  "use HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] for an OCI registry (e.g. localhost:5000/team/app:v1), OWNER/NAME for a snapshot listed in a hub index (--hub URL or FORKD_HUB_URL), or the https:// URL of a .forkd.tar.zst";

function shown(value: string): string {
  return value.length > 200 ? `${value.slice(0, 200)}…` : value;
}

/** Hosts the user allowed over http: the option, then FORKD_INSECURE_REGISTRIES (comma-separated). */
function insecureHosts(opts: RefOpts = {}): string[] {
  return [...(opts.insecureRegistries ?? []), ...setting("insecureRegistries")].map((h) => h.toLowerCase());
}

function hostOnly(host: string): string {
  if (host.startsWith("[")) return host.slice(0, host.indexOf("]") + 1);
  const colon = host.lastIndexOf(":");
  return colon < 0 ? host : host.slice(0, colon);
}

function isLoopbackHost(host: string): boolean {
  const name = hostOnly(host.toLowerCase());
  return name === "localhost" || name === "[::1]" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

/**
 * Plain http is for this machine's own registries and hosts named by the user;
 * anything else must be https, so neither credentials nor unverified packs cross
 * a network in clear.
 */
export function plainHttpAllowed(host: string, opts: RefOpts = {}): boolean {
  const lower = host.toLowerCase();
  if (isLoopbackHost(lower)) return true;
  const allowed = insecureHosts(opts);
  return allowed.includes(lower) || allowed.includes(hostOnly(lower));
}

function looksLikeHost(first: string): boolean {
  return first.includes(".") || first.includes(":") || first.startsWith("[") || first.toLowerCase() === "localhost";
}

/** HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] (TAG defaults to latest). */
export function parseRegistryRef(value: unknown, opts: RefOpts = {}): RegistryRef {
  if (typeof value !== "string" || value.length === 0) throw new ForkdError("bad_request", `a registry reference is needed; ${FORMS}`);
  if (value.length > 512 || /[\s\0]/.test(value))
    throw new ForkdError("bad_request", `'${shown(value)}' is not a registry reference; ${FORMS}`);
  const slash = value.indexOf("/");
  const first = slash < 0 ? value : value.slice(0, slash);
  if (slash < 0 || !looksLikeHost(first)) {
    throw new ForkdError(
      "bad_request",
      `'${shown(value)}' does not start with a registry host (a name with a dot or a port, or localhost); ${FORMS}`,
    );
  }
  const port = HOST_RE.exec(first);
  if (!port || (port[1] !== undefined && (Number(port[1]) < 1 || Number(port[1]) > 65535))) {
    throw new ForkdError("bad_request", `'${shown(first)}' is not a registry host name[:port]`);
  }
  let rest = value.slice(slash + 1);
  let tag: string | undefined;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_REF_RE.test(digest))
      throw new ForkdError("bad_request", `'${shown(digest)}' is not a digest: forkd reads sha256:<64 hex digits>`);
  } else {
    const colon = rest.lastIndexOf(":");
    if (colon > rest.lastIndexOf("/")) {
      tag = rest.slice(colon + 1);
      rest = rest.slice(0, colon);
      if (!TAG_RE.test(tag)) {
        throw new ForkdError(
          "bad_request",
          `'${shown(tag)}' is not a registry tag (a letter, digit or '_' first, then up to 127 of [A-Za-z0-9_.-])`,
        );
      }
    } else {
      tag = "latest";
    }
  }
  const host = first.toLowerCase();
  let repository = rest;
  let apiHost = host;
  // Docker Hub's names and API host are not its reference's.
  if (host === "docker.io" || host === "index.docker.io") {
    apiHost = "registry-1.docker.io";
    if (!repository.includes("/")) repository = `library/${repository}`;
  }
  if (!REPOSITORY_RE.test(repository) || host.length + repository.length + 1 > 255) {
    throw new ForkdError(
      "bad_request",
      `'${shown(rest)}' is not a repository name (lowercase letters and digits, separated by '.', '_', '__', '-' or '/')`,
    );
  }
  const reference = digest ?? tag!;
  return {
    kind: "registry",
    host,
    apiHost,
    repository,
    ...(tag ? { tag } : {}),
    ...(digest ? { digest } : {}),
    reference,
    scheme: plainHttpAllowed(host, opts) ? "http" : "https",
    display: `${host}/${repository}${digest ? `@${digest}` : `:${tag}`}`,
  };
}

/** An http(s) URL forkd may fetch: no credentials in it, http only where allowed. */
export function parseFetchUrl(value: string, opts: RefOpts = {}, what = "URL"): URL {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ForkdError("bad_request", `'${shown(value)}' is not a ${what}`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new ForkdError("bad_request", `${what} ${shown(value)} is not http(s)`);
  }
  // Credentials in a URL end up in logs and job records.
  if (url.username || url.password) throw new ForkdError("bad_request", `${what} must not carry credentials (user:password@)`);
  if (url.protocol === "http:" && !plainHttpAllowed(url.host, opts)) {
    throw new ForkdError(
      "bad_request",
      `${what} ${url.origin} is plain http; forkd fetches over http only from this machine (localhost, 127.0.0.1) or from hosts named with --insecure-registry HOST / FORKD_INSECURE_REGISTRIES`,
    );
  }
  return url;
}

/** Which of the three forms `value` is; refuses anything that is none of them, naming all three. */
export function parsePullSource(value: unknown, opts: RefOpts = {}): PullSource {
  if (typeof value !== "string" || value.length === 0) throw new ForkdError("bad_request", `what to pull is missing; ${FORMS}`);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) return { kind: "url", url: parseFetchUrl(value, opts, "pack URL") };
  const first = value.split("/")[0] ?? "";
  if (value.includes("/") && looksLikeHost(first)) return parseRegistryRef(value, opts);
  if (HUB_NAME_RE.test(value)) return { kind: "hub", name: value };
  throw new ForkdError("bad_request", `'${shown(value)}' is not something forkd can pull; ${FORMS}`);
}
