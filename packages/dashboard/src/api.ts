// The page's client of the daemon's public REST API v1: every call carries the
// bearer token and goes through the same validated, audited routes as any other
// client's. Types here are what the page reads of each answer.

export type Sandbox = {
  id: string;
  snapshot_tag: string | null;
  guest_addr: string;
  created_at: string;
  created_at_unix: number;
  memory_mib: number;
  vcpus: number;
  memory_limit_mib: number | null;
  state: string;
  network: string;
  network_policy: { mode: string; allow_out: string[]; deny_out: string[] } | null;
  expires_at: string | null;
  health: "healthy" | "unhealthy";
  health_reason: string | null;
  branch_count: number;
  /** The node that runs it: present only when the daemon is part of a cluster (merged lists). */
  node?: string;
  metadata: Record<string, string>;
};

export type Snapshot = {
  tag: string;
  status: "ready" | "writing" | "failed";
  created_at?: string;
  created_at_unix: number;
  branched_from?: string;
  pause_ms?: number;
  parent?: string | null;
  storage?: "full" | "diff";
  mode?: string;
  memory_bytes?: number;
  physical_bytes?: number;
  memory_mib?: number;
  image?: string;
  error?: string | null;
  warning?: string;
};

export type SnapshotInfo = { tag: string; chain_depth: number; dependents: string[]; logical_bytes: number; physical_bytes: number };
export type Pool = { tag: string; size: number; ready: number; starting: number; updated_at: string | null };
export type Job = {
  id: string;
  kind: string;
  status: "running" | "succeeded" | "failed";
  progress: { done_bytes: number; total_bytes: number; step: string };
  error: { code: string; message: string } | null;
  created_at: string;
};
export type MetricsSummary = {
  ts: string;
  sandboxes_active: number;
  forks_per_min: number;
  spawn_p50_ms: number | null;
  spawn_p99_ms: number | null;
  pool_claim_p50_ms: number | null;
  pool_claim_p99_ms: number | null;
  pool_claims_seen: number;
  host: {
    mem_total_bytes: number;
    mem_available_bytes: number;
    shm_total_bytes: number;
    shm_free_bytes: number;
    shm_reserved_bytes: number;
  };
  sandboxes: Record<string, { memory_bytes: number | null; cpu_usec: number | null }>;
};
export type FileEntry = { name: string; type: "file" | "dir" | "symlink" | "other"; size: number; mode: number; mtimeMs: number };
export type ProcessInfo = { pid: number; running: boolean };

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

const TOKEN_KEY = "forkd-token";

export function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function storeToken(token: string | null): void {
  if (token === null) sessionStorage.removeItem(TOKEN_KEY);
  else sessionStorage.setItem(TOKEN_KEY, token);
}

/**
 * `#token=…` logs in: the fragment never reaches the server or its logs, and is
 * taken out of the address bar (and history) at once.
 */
export function takeTokenFromFragment(): void {
  const m = /^#token=([^&]+)/.exec(location.hash);
  if (!m) return;
  storeToken(decodeURIComponent(m[1]!));
  history.replaceState(null, "", location.pathname + location.search);
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const token = storedToken();
  const res = await fetch(path, {
    method,
    headers: {
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...(body !== undefined ? { "content-type": "application/json" } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  if (!res.ok) {
    const e = parsed as { error?: string; code?: string } | undefined;
    throw new ApiError(res.status, e?.code ?? "http", e?.error ?? `${method} ${path}: HTTP ${res.status}`);
  }
  return parsed as T;
}

export const enc = encodeURIComponent;

/**
 * Reads a streaming response (SSE or NDJSON) with the token in a header:
 * EventSource cannot send one, and the token must not go in a URL.
 */
export async function stream(path: string, init: RequestInit, onChunk: (text: string) => void, signal: AbortSignal): Promise<void> {
  const token = storedToken();
  const res = await fetch(path, {
    ...init,
    signal,
    headers: { ...(init.headers as Record<string, string> | undefined), ...(token ? { authorization: `Bearer ${token}` } : {}) },
  });
  if (!res.ok || !res.body) throw new ApiError(res.status, "http", `${path}: HTTP ${res.status}`);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onChunk(value);
  }
}

/** Server-sent events over `stream`: calls `onEvent` with each event's type and parsed data. */
export function eventStream(onEvent: (type: string, data: unknown) => void, onState: (connected: boolean) => void): () => void {
  const abort = new AbortController();
  let closed = false;
  const run = async () => {
    let delay = 1000;
    while (!closed) {
      let buffer = "";
      try {
        await stream(
          "/v1/events",
          { method: "GET" },
          (text) => {
            onState(true);
            delay = 1000;
            buffer += text;
            let end = buffer.indexOf("\n\n");
            while (end >= 0) {
              const frame = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              let type = "message";
              const data: string[] = [];
              for (const line of frame.split("\n")) {
                if (line.startsWith("event: ")) type = line.slice(7);
                else if (line.startsWith("data: ")) data.push(line.slice(6));
              }
              if (data.length) {
                try {
                  onEvent(type, JSON.parse(data.join("\n")));
                } catch {
                  // a frame that is not JSON is skipped
                }
              }
              end = buffer.indexOf("\n\n");
            }
          },
          abort.signal,
        );
      } catch {
        // reconnect below
      }
      onState(false);
      if (closed) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15_000);
    }
  };
  run().catch(() => onState(false));
  return () => {
    closed = true;
    abort.abort();
  };
}
