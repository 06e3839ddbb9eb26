// One daemon's place in a cluster: its configuration, its membership (lease and
// record), the catalog and the tag namespace, and the calls other code makes
// (list live nodes, find a sandbox's node, claim a tag, call another node). The
// daemon builds one ClusterNode at start-up when --cluster is given; everything
// host-specific (what runs here, what it holds) is passed in as callbacks, so this
// package depends on core's types only.
import fs from "node:fs";
import { ForkdError } from "@forkd/core";
import { Catalog, type PendingDelete } from "./catalog.js";
import { EtcdStore, keys, parseEtcdUrl } from "./etcd.js";
import { peerRequest } from "./forward.js";
import { listNodes, Membership, type NodeRecord, type NodeStatus, validateAdvertiseUrl, validateNodeName } from "./membership.js";
import { TagNamespace } from "./tags.js";

export type ClusterConfig = {
  /** etcd endpoints as http URLs (parseEtcdUrl). */
  endpoints: string[];
  name: string;
  /** Where the other nodes reach this node's API. */
  url: string;
  /** The secret every node presents to the others. */
  token: string;
  leaseTtlS: number;
  timeoutMs: number;
  /** oci://HOST/REPO: where snapshots travel between nodes. */
  registry?: string | undefined;
  version: string;
};

/** What the daemon tells the cluster about its host. */
export type ClusterHost = {
  status: () => Promise<NodeStatus>;
  /** The ids of the sandboxes this node runs (its SQLite). */
  localSandboxes: () => string[];
  /** The tags this node holds (its SQLite). */
  localTags: () => Promise<string[]>;
  /** Apply a delete asked for while this node was away. */
  applyDelete: (d: PendingDelete) => Promise<void>;
  log: (line: string) => void;
};

const MIN_TOKEN_CHARS = 16;

/** The cluster secret from a file (first line, trimmed) or a value; checked for length, never echoed. */
export function readClusterToken(opts: { file?: string | undefined; value?: string | undefined }): string {
  const token = opts.file ? fs.readFileSync(opts.file, "utf8").split("\n")[0]!.trim() : (opts.value ?? "").trim();
  if (!token) throw new ForkdError("bad_request", "a cluster needs a shared secret: --cluster-token-file FILE or FORKD_CLUSTER_TOKEN");
  if (token.length < MIN_TOKEN_CHARS) {
    throw new ForkdError("bad_request", `the cluster token must be at least ${MIN_TOKEN_CHARS} characters (it was shorter)`);
  }
  return token;
}

/** Check and normalise what --cluster, --node-name and --advertise-url gave. */
export function clusterConfig(opts: Omit<ClusterConfig, "endpoints"> & { cluster: string }): ClusterConfig {
  const { cluster, ...rest } = opts;
  if (rest.registry !== undefined && !/^oci:\/\/[^\s/]+\/\S+$/.test(rest.registry)) {
    throw new ForkdError("bad_request", `--registry wants oci://HOST[:PORT]/REPOSITORY, got '${rest.registry}'`);
  }
  return {
    ...rest,
    endpoints: parseEtcdUrl(cluster),
    name: validateNodeName(rest.name),
    url: validateAdvertiseUrl(rest.url),
  };
}

export class ClusterNode {
  readonly etcd: EtcdStore;
  readonly catalog: Catalog;
  readonly tags: TagNamespace;
  private readonly membership: Membership;

  private constructor(
    readonly config: ClusterConfig,
    private readonly host: ClusterHost,
  ) {
    this.etcd = new EtcdStore(config.endpoints, config.timeoutMs);
    this.catalog = new Catalog(this.etcd, config.name, host.log);
    this.tags = new TagNamespace(this.etcd, config.name);
    this.membership = new Membership({
      etcd: this.etcd,
      name: config.name,
      url: config.url,
      version: config.version,
      leaseTtlS: config.leaseTtlS,
      status: host.status,
      log: host.log,
      onJoined: () => this.republish(),
      onHeartbeat: () => this.syncCatalog(),
    });
  }

  /** Join (or fail: etcd unreachable, the name taken); afterwards the node keeps its lease and rejoins by itself. */
  static async start(config: ClusterConfig, host: ClusterHost): Promise<ClusterNode> {
    const node = new ClusterNode(config, host);
    try {
      await node.membership.start();
    } catch (err) {
      await node.close();
      throw err;
    }
    return node;
  }

  get name(): string {
    return this.config.name;
  }

  get token(): string {
    return this.config.token;
  }

  /** "joined" while the node holds its lease; otherwise it refuses new work. */
  get state() {
    return this.membership.state;
  }

  /** Throws 503 `cluster_unavailable` unless this node holds its lease (new work waits for a rejoin). */
  assertJoined(what: string): void {
    this.membership.assertJoined(what);
  }

  /** Deletes first (what was killed or removed while away must not be re-published), then the catalog and tags. */
  private async republish(): Promise<void> {
    const applied = await this.catalog.applyPendingDeletes((d) => this.host.applyDelete(d));
    const { put, removed } = await this.catalog.republish(this.host.localSandboxes());
    const heldElsewhere = await this.tags.republish(await this.host.localTags());
    this.host.log(
      `forkd cluster: ${this.name} published ${put} sandbox(es), dropped ${removed} stale catalog entr${removed === 1 ? "y" : "ies"}, applied ${applied} delete(s) made while away${heldElsewhere.length ? `; ${heldElsewhere.length} tag(s) here were created on other nodes` : ""}`,
    );
  }

  /** Publish the catalog's changes now (after a fork or a kill, before the answer leaves). */
  async syncCatalog(): Promise<void> {
    if (this.membership.state !== "joined") return;
    await this.catalog.sync(this.host.localSandboxes());
  }

  /** Refresh this node's record now (after a drain, a new snapshot), not at the next heartbeat. */
  async refresh(): Promise<void> {
    await this.membership.putRecord();
  }

  /** The nodes holding a lease now, with their capacity, load, drain flag and the snapshots each holds. */
  nodes(): Promise<NodeRecord[]> {
    return listNodes(this.etcd);
  }

  /** The node a sandbox runs on per the catalog (undefined: no node published it). */
  sandboxNode(id: string): Promise<string | undefined> {
    return this.catalog.owner(id);
  }

  /** Stop (or resume) placing work on `node`; kept in etcd across restarts. */
  async setDraining(node: string, draining: boolean): Promise<void> {
    validateNodeName(node);
    if (draining) await this.etcd.put(keys.drain(node), "1");
    else await this.etcd.delete(keys.drain(node));
  }

  /** A JSON call to another node's API, served there (a forwarded request is never sent on). */
  async call<T = unknown>(node: NodeRecord, method: string, path: string, body?: unknown, timeoutMs?: number) {
    return peerRequest<T>({
      base: node.url,
      node: node.name,
      self: this.name,
      clusterToken: this.config.token,
      method,
      path,
      body,
      timeoutMs: timeoutMs ?? Math.max(this.config.timeoutMs, 30_000),
    });
  }

  async close(): Promise<void> {
    await this.membership.close();
    this.etcd.close();
  }
}
