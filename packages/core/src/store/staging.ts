// Staged memory images: the shmem copies of snapshot memory that children map.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir, stageBudgetBytes } from "../common/config.js";
import { exists } from "../common/fsutil.js";
import { isAlive } from "../vmm/process.js";
import { sandboxes, staged } from "./state.js";

/** What staging needs to know of a snapshot. */
export type StageableSnapshot = { tag: string; memorySha256: string };

export function stageKey(manifest: StageableSnapshot): string {
  return `${manifest.tag}@${manifest.memorySha256.slice(0, 16)}`;
}

export function stagedPath(manifest: StageableSnapshot): string {
  return path.join(shmDir(), "images", stageKey(manifest), "memory.bin");
}

/**
 * The shmem copy of a snapshot's memory image that children map. Staged on first
 * use by a kernel-side copy from the durable store, then kept within the budget.
 */
export async function ensureStaged(snapshot: StageableSnapshot & { memoryPath: string }): Promise<string> {
  const target = stagedPath(snapshot);
  const key = stageKey(snapshot);
  if (!(await exists(target))) {
    const dir = path.dirname(target);
    const temp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
    await fsp.mkdir(temp, { recursive: true, mode: 0o700 });
    try {
      await fsp.copyFile(snapshot.memoryPath, path.join(temp, "memory.bin"), fs.constants.COPYFILE_FICLONE);
      await fsp.chmod(path.join(temp, "memory.bin"), 0o444);
      await fsp.rename(temp, dir).catch(async (err: NodeJS.ErrnoException) => {
        // Someone else staged it meanwhile: theirs is as good as ours.
        if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
      });
    } finally {
      await fsp.rm(temp, { recursive: true, force: true });
    }
  }
  const stat = await fsp.stat(target);
  staged.upsert({ key, tag: snapshot.tag, path: target, bytes: stat.blocks * 512, last_used_ms: Date.now() });
  await enforceStageBudget(key);
  return target;
}

/** Evict least recently used staged images beyond the budget, never one with live children or the one just used. */
export async function enforceStageBudget(keep: string): Promise<void> {
  const rows = staged.list();
  let total = rows.reduce((sum, r) => sum + r.bytes, 0);
  const budget = stageBudgetBytes();
  for (const row of rows) {
    if (total <= budget) break;
    if (row.key === keep) continue;
    const live = sandboxes.byTag(row.tag).some((s) => isAlive(s.pid));
    if (live) continue;
    await fsp.rm(path.dirname(row.path), { recursive: true, force: true });
    staged.remove(row.key);
    total -= row.bytes;
  }
}
