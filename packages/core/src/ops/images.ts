// Image operations that must ask which snapshots use a build: guarded rebuilds and prune.
import { type BuildImageOpts, buildGuestImage, type ImageManifest, pruneImageBuilds } from "../guest/image.js";
import { listSnapshots } from "../store/snapshots.js";

async function snapshotsUsing(digest: string): Promise<string[]> {
  return (await listSnapshots()).filter((snap) => snap.image.digest === digest).map((snap) => snap.tag);
}

/** Build (or reuse) an image; a forced rebuild of a build that snapshots use is refused. */
export function buildImage(opts: BuildImageOpts = {}): Promise<{ manifest: ImageManifest; cached: boolean }> {
  return buildGuestImage(opts, snapshotsUsing);
}

/** Remove image builds that are neither current nor used by a snapshot. */
export async function pruneImages(): Promise<{ removed: string[]; keptForSnapshots: string[] }> {
  return pruneImageBuilds(new Set((await listSnapshots()).map((s) => s.image.digest)));
}
