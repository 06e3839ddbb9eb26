// The one place forkd talks to etcd: endpoints parsed from `etcd://HOST:PORT[,…]`,
// the key layout, and a small typed client whose every call has a deadline and fails
// as a ForkdError `cluster_unavailable` (never a hang, never a gRPC error a route
// would report as `internal`).
//
// Key layout (everything under /forkd/; README "Cluster" lists it):
//   nodes/NODE              the node's record (JSON), attached to its lease: gone when the lease lapses
//   drain/NODE              "1" while the node is drained (kept across restarts)
//   catalog/SANDBOX_ID      the node that runs the sandbox (its name)
//   tags/TAG                the node that created the tag (its name): one tag namespace
//   deletes/NODE/KIND/KEY   a delete asked for while NODE was away (KIND sandbox or snapshot), applied when it rejoins
import { ForkdError } from "@forkd/core";
import { ConsecutiveBreaker, circuitBreaker, handleWhen, noop, retry } from "cockatiel";
import { Etcd3, isRecoverableError, type Lease } from "etcd3";

const KEY_PREFIX = "/forkd/";

export const keys = {
  node: (name: string) => `${KEY_PREFIX}nodes/${name}`,
  nodes: `${KEY_PREFIX}nodes/`,
  drain: (name: string) => `${KEY_PREFIX}drain/${name}`,
  drains: `${KEY_PREFIX}drain/`,
  sandbox: (id: string) => `${KEY_PREFIX}catalog/${id}`,
  catalog: `${KEY_PREFIX}catalog/`,
  tag: (tag: string) => `${KEY_PREFIX}tags/${tag}`,
  tags: `${KEY_PREFIX}tags/`,
  pendingDelete: (node: string, kind: PendingDeleteKind, key: string) => `${KEY_PREFIX}deletes/${node}/${kind}/${key}`,
  pendingDeletes: (node: string) => `${KEY_PREFIX}deletes/${node}/`,
};

export type PendingDeleteKind = "sandbox" | "snapshot";

const HOST_PORT_RE = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$/;

/** `etcd://HOST:PORT[,HOST:PORT…]` as the http URLs the client dials; anything else is a bad_request naming the part. */
export function parseEtcdUrl(value: string): string[] {
  const m = /^etcd:\/\/([^/]+)\/?$/.exec(value.trim());
  if (!m) throw new ForkdError("bad_request", `--cluster wants etcd://HOST:PORT[,HOST:PORT…], got '${value}'`);
  return m[1]!.split(",").map((hostPort) => {
    const hp = HOST_PORT_RE.exec(hostPort);
    const port = Number(hp?.[2]);
    if (!hp || port < 1 || port > 65535) throw new ForkdError("bad_request", `--cluster: '${hostPort}' is not HOST:PORT`);
    return `http://${hostPort}`;
  });
}

/** The key's last part (a node name, a sandbox id, a tag). */
export function lastPart(key: string): string {
  return key.slice(key.lastIndexOf("/") + 1);
}

/** A failure of etcd itself (unreachable, deadline, closed) as forkd's typed error; ours pass through. */
function unavailable(what: string, err: unknown): ForkdError {
  if (err instanceof ForkdError) return err;
  return new ForkdError(
    "cluster_unavailable",
    `etcd did not answer (${what}): ${(err as Error).message ?? String(err)}`,
    {},
    { cause: err },
  );
}

/**
 * etcd, as forkd uses it. A call that cannot reach a member tries the next one (a
 * member that failed is skipped for 5 s), and fails once each member has had its
 * `timeoutMs`: then the caller decides (the membership loop retries, a route answers
 * 503 `cluster_unavailable`). No other retries: a hung call is worse than a clear 503.
 */
export class EtcdStore {
  readonly client: Etcd3;

  constructor(
    readonly endpoints: string[],
    readonly timeoutMs: number,
  ) {
    this.client = new Etcd3({
      hosts: endpoints,
      dialTimeout: timeoutMs,
      faultHandling: {
        host: () => circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: 5000, breaker: new ConsecutiveBreaker(1) }),
        global: endpoints.length > 1 ? retry(handleWhen(isRecoverableError), { maxAttempts: endpoints.length - 1 }) : noop,
      },
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + timeoutMs }),
    });
  }

  private async call<T>(what: string, run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (err) {
      throw unavailable(what, err);
    }
  }

  get(key: string): Promise<string | null> {
    return this.call(`get ${key}`, () => this.client.get(key).string());
  }

  /** Every key under `prefix`, with its value. */
  getPrefix(prefix: string): Promise<Record<string, string>> {
    return this.call(`list ${prefix}`, () => this.client.getAll().prefix(prefix).strings());
  }

  put(key: string, value: string): Promise<void> {
    return this.call(`put ${key}`, async () => {
      await this.client.put(key).value(value);
    });
  }

  delete(key: string): Promise<void> {
    return this.call(`delete ${key}`, async () => {
      await this.client.delete().key(key);
    });
  }

  /** Create `key` only if it does not exist (one etcd transaction): true if this call created it. */
  createIfAbsent(key: string, value: string): Promise<boolean> {
    return this.call(`create ${key}`, async () => {
      const res = await this.client.if(key, "Create", "==", 0).then(this.client.put(key).value(value)).commit();
      return res.succeeded;
    });
  }

  /** Delete `key` only while it still holds `value` (one transaction): someone else's key is never removed. */
  deleteIfValue(key: string, value: string): Promise<boolean> {
    return this.call(`delete ${key}`, async () => {
      const res = await this.client.if(key, "Value", "==", value).then(this.client.delete().key(key)).commit();
      return res.succeeded;
    });
  }

  /** Put `key` unless it holds another value than `expected` (absent counts as expected): false if someone else holds it. */
  putUnlessHeldByOther(key: string, expected: string, value: string): Promise<boolean> {
    return this.call(`put ${key}`, async () => {
      const created = await this.client.if(key, "Create", "==", 0).then(this.client.put(key).value(value)).commit();
      if (created.succeeded) return true;
      const res = await this.client.if(key, "Value", "==", expected).then(this.client.put(key).value(value)).commit();
      return res.succeeded;
    });
  }

  /** A lease of `ttlS` seconds, kept alive by the client until it is lost or revoked. */
  async grantLease(ttlS: number): Promise<Lease> {
    const lease = this.client.lease(ttlS, { autoKeepAlive: true });
    try {
      await lease.grant();
    } catch (err) {
      lease.release();
      throw unavailable("grant a lease", err);
    }
    return lease;
  }

  close(): void {
    this.client.close();
  }
}
