// One tag namespace for the cluster: tags/TAG names the node that created it, and a
// tag is claimed in one etcd transaction (create if absent) before a node writes a
// snapshot under it, so two nodes never create the same tag. Creating a tag that
// exists anywhere is a 400, as forkd answers an existing tag on one host. Copies of
// a tag pulled onto other nodes are not claims: each node's record lists what it holds.
import { ForkdError, validateName } from "@forkd/core";
import { type EtcdStore, keys, lastPart } from "./etcd.js";

/** How a claim went: "claimed" (new, release it if the create fails) or "ours" (this node already held it). */
export type TagClaim = "claimed" | "ours";

export class TagNamespace {
  constructor(
    private readonly etcd: EtcdStore,
    private readonly self: string,
  ) {}

  /** The node that created `tag`, or undefined when no node has. */
  async owner(tag: string): Promise<string | undefined> {
    validateName(tag, "tag");
    return (await this.etcd.get(keys.tag(tag))) ?? undefined;
  }

  /** Every claimed tag and the node that created it. */
  async all(): Promise<Map<string, string>> {
    const entries = await this.etcd.getPrefix(keys.tags);
    return new Map(Object.entries(entries).map(([k, v]) => [lastPart(k), v]));
  }

  /**
   * Claim `tag` for this node before creating it: a 400 when another node holds it
   * (the caller's own "already exists" check covers a tag this node holds).
   */
  async claim(tag: string): Promise<TagClaim> {
    validateName(tag, "tag");
    if (await this.etcd.createIfAbsent(keys.tag(tag), this.self)) return "claimed";
    const holder = await this.etcd.get(keys.tag(tag));
    if (holder === this.self) return "ours";
    // Released between the two calls: one more try decides it.
    if (holder === null && (await this.etcd.createIfAbsent(keys.tag(tag), this.self))) return "claimed";
    throw new ForkdError(
      "bad_request",
      `snapshot ${tag} already exists in the cluster (created on node ${holder ?? "another node"}); DELETE /v1/snapshots/${tag} first or pick another tag`,
      { tag, node: holder },
    );
  }

  /** Give up this node's claim (a create that failed, an rmi): another node's claim is never touched. */
  async release(tag: string): Promise<void> {
    await this.etcd.deleteIfValue(keys.tag(tag), this.self);
  }

  /** Drop the claim whoever holds it (a cluster-wide rmi of the tag). */
  async remove(tag: string): Promise<void> {
    validateName(tag, "tag");
    await this.etcd.delete(keys.tag(tag));
  }

  /** Claim every tag this node holds that no node has claimed (a join, after etcd was rebuilt): returns those another node holds. */
  async republish(local: string[]): Promise<string[]> {
    const clashes: string[] = [];
    for (const tag of local) {
      if (await this.etcd.createIfAbsent(keys.tag(tag), this.self)) continue;
      const holder = await this.etcd.get(keys.tag(tag));
      if (holder !== this.self) clashes.push(tag);
    }
    return clashes;
  }
}

/** The tag a call would create (route as registered, body as validated), undefined for calls that create none or pick their own. */
export function tagCreatedBy(method: string, route: string | undefined, body: unknown): string | undefined {
  if (method !== "POST" || !route || typeof body !== "object" || body === null) return undefined;
  const b = body as { tag?: unknown; to?: unknown };
  const pick = (v: unknown) => (typeof v === "string" && v !== "" ? v : undefined);
  if (route === "/v1/snapshots" || route === "/v1/sandboxes/:id/branch" || route === "/v1/sandboxes/:id/fork") return pick(b.tag);
  if (route === "/v1/snapshots/:tag/compact") return pick(b.to);
  return undefined;
}
