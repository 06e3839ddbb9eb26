// Templates are forkd snapshot tags. E2B's `base` is forkd's `e2b-base`: a warm
// snapshot of the `debian` image (core's recipe: bash, coreutils, python3, sudo,
// git, user `user`), built on first use with progress lines in the daemon log.
// scripts/setup.sh builds the image ahead of time, so first use costs one boot.
import { admitSnapshot, buildImage, createSnapshot, getSnapshot, isForkdError } from "@forkd/core";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";

export const BASE_TEMPLATE = "base";
export const BASE_SNAPSHOT_TAG = "e2b-base";
const BASE_IMAGE = "debian";
const BASE_MEMORY_MIB = 256;
/**
 * Run once in the parent before the snapshot, so a child's first `bash -l` and
 * python3 find their pages in memory it shares, as today's children's first exec does.
 */
const BASE_WARM = ["/bin/bash -lc true", "python3 -c pass", "su -s /bin/bash user -c true"];

let baseBuild: Promise<void> | undefined;

type Snapshot = Awaited<ReturnType<typeof getSnapshot>>;

async function findSnapshot(tag: string): Promise<Snapshot | undefined> {
  try {
    return await getSnapshot(tag);
  } catch (err) {
    if (isForkdError(err) && (err.code === "snapshot_not_found" || err.code === "invalid_tag")) return undefined;
    throw err;
  }
}

/** The snapshot a template id names, with its E2B alias; `base` is built on first use; otherwise E2B's 404. */
export async function templateSnapshot(e2b: E2bContext, templateID: string): Promise<{ snapshot: Snapshot; alias: string | null }> {
  if (templateID === BASE_TEMPLATE) return { snapshot: await baseSnapshot(e2b), alias: BASE_TEMPLATE };
  const snapshot = await findSnapshot(templateID);
  if (!snapshot)
    throw new E2bHttpError(404, `template '${templateID.slice(0, 64)}' not found (forkd's templates are its snapshot tags: forkd images)`);
  return { snapshot, alias: null };
}

async function baseSnapshot(e2b: E2bContext): Promise<Snapshot> {
  const found = await findSnapshot(BASE_SNAPSHOT_TAG);
  if (found) return found;
  // One build at a time: concurrent first creates wait for the same one.
  baseBuild ??= buildBase(e2b).finally(() => {
    baseBuild = undefined;
  });
  await baseBuild;
  const built = await findSnapshot(BASE_SNAPSHOT_TAG);
  if (!built) throw new E2bHttpError(500, `building the base template left no snapshot ${BASE_SNAPSHOT_TAG}`);
  return built;
}

async function buildBase(e2b: E2bContext): Promise<void> {
  const started = performance.now();
  e2b.log(`building the template '${BASE_TEMPLATE}' on first use (image ${BASE_IMAGE}, snapshot ${BASE_SNAPSHOT_TAG})…`);
  const { cached } = await buildImage({
    name: BASE_IMAGE,
    onProgress: (step) => e2b.log(`template ${BASE_TEMPLATE}: image ${BASE_IMAGE}: ${step}`),
  });
  const ticket = await admitSnapshot(e2b.deps.admission, BASE_MEMORY_MIB);
  try {
    await createSnapshot({
      tag: BASE_SNAPSHOT_TAG,
      image: BASE_IMAGE,
      memoryMib: BASE_MEMORY_MIB,
      warm: BASE_WARM,
      onProgress: (step) => e2b.log(`template ${BASE_TEMPLATE}: ${step}`),
    });
  } finally {
    ticket.release();
  }
  e2b.log(
    `template '${BASE_TEMPLATE}' ready in ${((performance.now() - started) / 1000).toFixed(1)} s${cached ? " (image from the cache)" : ""}`,
  );
}
