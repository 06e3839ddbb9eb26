// Where forkd's clients find the daemon: one reading of FORKD_URL / FORKD_TOKEN
// and the local socket, shared by the Controller, the CLI and the MCP server.
import fs from "node:fs";
import path from "node:path";
import { ForkdApiError } from "./api-error.js";
import { processEnvironment } from "./environment.js";

export type DaemonTarget = {
  /** Base URL requests go to (for a unix socket, a placeholder host). */
  base: string;
  /** Set when the daemon is reached over its unix socket. */
  socketPath?: string;
  token?: string;
  /** What to call it in messages: the URL, or unix:PATH. */
  label: string;
};

/** forkd's default TCP address, tried when no URL is set and no local socket exists. */
export const DEFAULT_URL = "http://127.0.0.1:8889";

/** Host part of a URL for a unix socket: the socket, not the host, picks the daemon. */
const SOCKET_BASE = "http://forkd";

export function isLoopbackUrl(url: string): boolean {
  try {
    const host = new URL(url).hostname.replace(/^\[|\]$/g, "");
    return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
  } catch {
    return false;
  }
}

/** $FORKD_RUN_DIR/forkd.sock, where the daemon listens by default (core's defaultSocketPath, which the SDK cannot import). */
function defaultSocketPath(env: NodeJS.ProcessEnv = processEnvironment()): string {
  return path.join(env.FORKD_RUN_DIR || "/run/forkd", "forkd.sock");
}

/** A target from an explicit URL (http(s)://HOST:PORT or unix:/path) or socket path; no environment read but the default socket's. */
export function targetOf(opts: { url?: string; socketPath?: string; token?: string }): DaemonTarget {
  let target: DaemonTarget;
  if (opts.url?.startsWith("unix:")) {
    const socketPath = opts.url.slice("unix:".length);
    target = { base: SOCKET_BASE, socketPath, label: opts.url };
  } else if (opts.url) {
    const base = opts.url.replace(/\/+$/, "");
    target = { base, label: base };
  } else {
    const socketPath = opts.socketPath ?? defaultSocketPath();
    target = { base: SOCKET_BASE, socketPath, label: `unix:${socketPath}` };
  }
  return opts.token ? { ...target, token: opts.token } : target;
}

/**
 * FORKD_URL (http(s)://host:port or unix:/path) and FORKD_TOKEN as forkd's clients
 * read them; unset, the local socket ($FORKD_SOCKET, else $FORKD_RUN_DIR/forkd.sock)
 * when it exists, else forkd's default URL.
 */
export function resolveTarget(env: NodeJS.ProcessEnv = processEnvironment()): DaemonTarget {
  let token = env.FORKD_TOKEN?.trim() || undefined;
  const url = env.FORKD_URL?.trim();
  let target: DaemonTarget;
  if (url) {
    target = targetOf({ url });
  } else {
    const socketPath = env.FORKD_SOCKET || defaultSocketPath(env);
    target = fs.existsSync(socketPath) ? targetOf({ socketPath }) : targetOf({ url: DEFAULT_URL });
  }
  // The local token file is offered only to a local daemon: sending it to a remote
  // FORKD_URL would hand this host's credential to another machine.
  if (!token && (target.socketPath || isLoopbackUrl(target.base))) {
    token = readLocalToken(path.join(env.FORKD_HOME ?? "/var/lib/forkd", "token"));
  }
  return token ? { ...target, token } : target;
}

/**
 * The daemon's token file, unless group or others may read or change it: such a
 * token is anyone's on this host, and a client using it would hide that (the
 * daemon refuses to start with it, the MCP server too). Missing or unreadable: none.
 */
function readLocalToken(file: string): string | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return undefined; // none readable: the socket needs none, and a TCP daemon will say 401 with what to do
  }
  try {
    const mode = fs.fstatSync(fd).mode & 0o777;
    if (mode & 0o077) {
      throw new ForkdApiError(
        0,
        "insecure_token_file",
        `the token file ${file} has mode ${mode.toString(8).padStart(4, "0")}: group or others can read or change it, so anyone on this host could use the daemon's token; run: chmod 600 ${file}`,
        { path: file },
        `chmod 600 ${file}`,
      );
    }
    return fs.readFileSync(fd, "utf8").trim() || undefined;
  } finally {
    fs.closeSync(fd);
  }
}
