// Snapshot chains: a diff snapshot's memory is its parent's plus its own pages.
// Staging a chain head assembles the whole image once (then children map it like
// any other), so the depth of a chain costs nothing per spawn.
import fs from "node:fs";
import fsp from "node:fs/promises";
import { ForkdError } from "../common/errors.js";
import { applyDiffLayer } from "./layers.js";
import { getSnapshot, listSnapshots, type SnapshotInfo } from "./snapshots.js";
import { ensureStaged } from "./staging.js";

/** Chains deeper than this are refused at registration: compact instead. */
export const MAX_CHAIN_DEPTH = 64;

/** The staged (whole, verified) memory image of a snapshot, assembling its chain if it is a layer. */
export async function stageSnapshot(snapshot: SnapshotInfo, depth = 0): Promise<string> {
  if (!snapshot.layer) return ensureStaged(snapshot);
  if (depth > MAX_CHAIN_DEPTH)
    throw new ForkdError("invalid_state", `snapshot ${snapshot.tag} is more than ${MAX_CHAIN_DEPTH} layers deep`);
  const layer = snapshot.layer;
  const parentTag = snapshot.parent;
  if (!parentTag) throw new ForkdError("integrity_failed", `snapshot ${snapshot.tag} is a diff layer without a parent`);
  const parent = await getSnapshot(parentTag).catch((err: unknown) => {
    throw new ForkdError(
      "integrity_failed",
      `snapshot ${snapshot.tag} is a layer on ${parentTag}, which is gone: ${(err as Error).message}`,
      {
        tag: snapshot.tag,
      },
    );
  });
  if (parent.memorySha256 !== layer.parentSha256) {
    throw new ForkdError(
      "integrity_failed",
      `snapshot ${snapshot.tag} was made on a ${parentTag} whose memory had sha256 ${layer.parentSha256.slice(0, 16)}…, but ${parentTag} now has ${parent.memorySha256.slice(0, 16)}…`,
      { tag: snapshot.tag },
    );
  }
  return ensureStaged({
    ...snapshot,
    assemble: async (target) => {
      const base = await stageSnapshot(parent, depth + 1);
      await fsp.copyFile(base, target, fs.constants.COPYFILE_FICLONE);
      await applyDiffLayer(target, snapshot.layerPath, snapshot.pagemapPath);
    },
  });
}

/** Oldest first: the snapshots whose memory a snapshot builds on. */
export async function ancestorsOf(snapshot: SnapshotInfo): Promise<SnapshotInfo[]> {
  const out: SnapshotInfo[] = [];
  let current = snapshot;
  while (current.layer && current.parent) {
    if (out.length >= MAX_CHAIN_DEPTH) break;
    current = await getSnapshot(current.parent);
    out.unshift(current);
  }
  return out;
}

/** Snapshots stored as layers on `tag` (direct dependents only). */
export async function dependentsOf(tag: string, all?: SnapshotInfo[]): Promise<SnapshotInfo[]> {
  return (all ?? (await listSnapshots())).filter((s) => s.layer && s.parent === tag);
}

/** `tag` and every snapshot that depends on it, leaves first (the order they can be removed in). */
export async function subtreeOf(tag: string): Promise<SnapshotInfo[]> {
  const all = await listSnapshots();
  const out: SnapshotInfo[] = [];
  const visit = async (t: string) => {
    for (const child of await dependentsOf(t, all)) await visit(child.tag);
    const self = all.find((s) => s.tag === t);
    if (self) out.push(self);
  };
  await visit(tag);
  return out;
}

/** Bytes a snapshot takes in the durable store (its own files only, holes not counted). */
export function physicalBytes(snapshot: SnapshotInfo): number {
  let total = 0;
  for (const file of [snapshot.memoryPath, snapshot.layerPath, snapshot.pagemapPath, snapshot.vmstatePath]) {
    try {
      total += fs.statSync(file).blocks * 512;
    } catch {
      // a layer has no memory.bin, a flat snapshot no layer
    }
  }
  return total;
}

export type SnapshotDetails = {
  // forkd v0.5.3's SnapshotInfoDetail
  tag: string;
  dir: string;
  created_at_unix: number;
  memory_logical_bytes: number;
  memory_physical_bytes: number;
  vmstate_bytes: number;
  parent_tag?: string;
  parent_content_hash?: string;
  chain_depth: number;
  // ours
  depth: number;
  ancestors: string[];
  dependents: string[];
  logical_bytes: number;
  physical_bytes: number;
  layers: { tag: string; kind: "full" | "diff"; physical_bytes: number; changed_pages: number | null }[];
};

export async function snapshotDetails(tag: string): Promise<SnapshotDetails> {
  const snapshot = await getSnapshot(tag);
  const ancestors = await ancestorsOf(snapshot);
  const chain = [...ancestors, snapshot];
  return {
    tag,
    dir: snapshot.dir,
    created_at_unix: Math.floor(Date.parse(snapshot.createdAt) / 1000),
    memory_logical_bytes: snapshot.sizes.memoryBytes,
    memory_physical_bytes: physicalBytes(snapshot) - snapshot.sizes.vmstateBytes,
    vmstate_bytes: snapshot.sizes.vmstateBytes,
    ...(snapshot.layer && snapshot.parent ? { parent_tag: snapshot.parent, parent_content_hash: snapshot.layer.parentSha256 } : {}),
    chain_depth: ancestors.length,
    depth: ancestors.length,
    ancestors: ancestors.map((a) => a.tag),
    dependents: (await dependentsOf(tag)).map((d) => d.tag),
    logical_bytes: snapshot.sizes.memoryBytes,
    physical_bytes: physicalBytes(snapshot),
    layers: chain.map((s) => ({
      tag: s.tag,
      kind: s.layer ? ("diff" as const) : ("full" as const),
      physical_bytes: physicalBytes(s),
      changed_pages: s.layer?.changedPages ?? null,
    })),
  };
}
