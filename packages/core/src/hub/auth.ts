// Registry credentials and the challenges registries answer with. Credentials come
// from FORKD_REGISTRY_USERNAME/PASSWORD or docker's config.json `auths`, and are
// only ever put in an Authorization header: never in a message, a log or a job.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { setting } from "../common/settings.js";

export type Credentials = { username: string; password: string /** Where they came from, for messages. */; source: string };
export type Challenge = { scheme: string; params: Record<string, string> };

/** docker's config file: $DOCKER_CONFIG/config.json, else ~/.docker/config.json. */
export function dockerConfigPath(): string {
  const dir = setting("dockerConfig");
  return dir ? path.join(dir, "config.json") : path.join(os.homedir(), ".docker", "config.json");
}

/** The host an `auths` key names: docker writes them as hosts, URLs, or Docker Hub's v1 index URL. */
function authsKeyHost(key: string): string {
  let host = key.trim().toLowerCase();
  host = host.replace(/^[a-z]+:\/\//, "");
  host = host.split("/")[0] ?? host;
  return host;
}

const DOCKER_HUB_HOSTS = new Set(["docker.io", "index.docker.io", "registry-1.docker.io"]);

function sameRegistry(a: string, b: string): boolean {
  if (a === b) return true;
  return DOCKER_HUB_HOSTS.has(a) && DOCKER_HUB_HOSTS.has(b);
}

/**
 * Credentials for `host` (as written in the reference, with its port): the
 * environment first, then config.json's `auths` (base64 user:password in `auth`,
 * or `username`/`password`). Credential helpers (credsStore) are programs forkd
 * does not run; their registries need the environment variables.
 */
export function registryCredentials(host: string): Credentials | undefined {
  const user = setting("registryUsername");
  const pass = setting("registryPassword");
  if (user && pass !== undefined) return { username: user, password: pass, source: "FORKD_REGISTRY_USERNAME/FORKD_REGISTRY_PASSWORD" };
  const file = dockerConfigPath();
  let config: { auths?: Record<string, { auth?: string; username?: string; password?: string }> };
  try {
    config = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    return undefined;
  }
  const wanted = host.toLowerCase();
  for (const [key, entry] of Object.entries(config?.auths ?? {})) {
    if (!entry || typeof entry !== "object" || !sameRegistry(authsKeyHost(key), wanted)) continue;
    if (typeof entry.auth === "string" && entry.auth) {
      const decoded = Buffer.from(entry.auth, "base64").toString("utf8");
      const colon = decoded.indexOf(":");
      if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1), source: file };
    }
    if (typeof entry.username === "string" && typeof entry.password === "string") {
      return { username: entry.username, password: entry.password, source: file };
    }
  }
  return undefined;
}

export function basicHeader(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString("base64")}`;
}

/**
 * WWW-Authenticate, RFC 7235: one or more `Scheme k=v, k="quoted, \"v\""`
 * challenges in one header. A token followed by '=' is a parameter; any other
 * token starts the next challenge.
 */
export function parseChallenges(header: string | null | undefined): Challenge[] {
  const out: Challenge[] = [];
  if (!header) return out;
  const s = header;
  let i = 0;
  const skip = () => {
    while (i < s.length && (s[i] === " " || s[i] === "\t" || s[i] === ",")) i++;
  };
  const token = () => {
    const start = i;
    while (i < s.length && /[!#$%&'*+.^_`|~0-9A-Za-z-]/.test(s[i]!)) i++;
    return s.slice(start, i);
  };
  let current: Challenge | undefined;
  while (i < s.length) {
    skip();
    const name = token();
    if (!name) {
      i++;
      continue;
    }
    let j = i;
    while (j < s.length && s[j] === " ") j++;
    if (s[j] === "=" && current) {
      i = j + 1;
      while (i < s.length && s[i] === " ") i++;
      let value = "";
      if (s[i] === '"') {
        i++;
        while (i < s.length && s[i] !== '"') {
          if (s[i] === "\\" && i + 1 < s.length) i++;
          value += s[i];
          i++;
        }
        i++;
      } else {
        const vs = i;
        while (i < s.length && s[i] !== ",") i++;
        value = s.slice(vs, i).trim();
      }
      current.params[name.toLowerCase()] = value;
    } else {
      current = { scheme: name.toLowerCase(), params: {} };
      out.push(current);
    }
  }
  return out;
}
