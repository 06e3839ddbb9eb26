// compact: a standalone (flat) copy of a snapshot, whatever its chain: its whole
// memory image and device state, no parent. The source stays as it was.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { validateName } from "../common/validate.js";
import { stageSnapshot } from "../store/chains.js";
import { getSnapshot, registerSnapshot, type SnapshotInfo, snapshotWorkDirs } from "../store/snapshots.js";

export async function compactSnapshot(tag: string, newTag: string): Promise<SnapshotInfo> {
  validateName(newTag, "tag");
  const source = await getSnapshot(tag);
  if (await getSnapshot(newTag).catch(() => undefined)) {
    throw new ForkdError("conflict", `snapshot ${newTag} already exists; pick another tag for the compact copy`, { tag: newTag });
  }
  const staged = await stageSnapshot(source);
  const { work, stageWork } = await snapshotWorkDirs();
  try {
    await fsp.copyFile(staged, path.join(stageWork, "memory.bin"), fs.constants.COPYFILE_FICLONE);
    await fsp.copyFile(source.vmstatePath, path.join(work, "vmstate.bin"));
    const { schema: _schema, createdAt: _createdAt, sizes: _sizes, memorySha256: _sha, layer: _layer, ...manifest } = source;
    const { dir: _dir, memoryPath: _m, layerPath: _l, pagemapPath: _p, vmstatePath: _v, staged: _s, ...base } = manifest;
    return await registerSnapshot({ work, stageWork, base: { ...base, tag: newTag, parent: null } });
  } finally {
    await fsp.rm(work, { recursive: true, force: true });
    await fsp.rm(stageWork, { recursive: true, force: true });
  }
}
