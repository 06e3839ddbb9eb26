// Captures children may restore from before they are registered as snapshots. A
// live capture (branch/live-capture.ts) is forkable the moment the source runs
// again: the staged image its source maps plus a device-state stream holding the
// written pages. Registering it as a durable snapshot (a copy of the image, a diff
// layer, a digest) takes a second or more; a fork of its tag in between restores
// from the capture instead of being told to wait. In-process only: another process
// sees the tag as "writing" until it is registered.
import { getSnapshot, type SnapshotInfo } from "../store/snapshots.js";

/** What a child restores from: the snapshot record, and the memory image it maps. */
export type CaptureSource = { snapshot: SnapshotInfo; memoryPath: string };

type Offer = { source: CaptureSource; inFlight: number; withdrawn: boolean; drained?: () => void };

const offers = new Map<string, Offer>();

/**
 * Let forks of `tag` restore from `source` until the returned function is called;
 * that resolves once no fork that started from the offer still needs its files.
 */
export function offerCapture(tag: string, source: CaptureSource): () => Promise<void> {
  const offer: Offer = { source, inFlight: 0, withdrawn: false };
  offers.set(tag, offer);
  return async () => {
    if (offers.get(tag) === offer) offers.delete(tag);
    offer.withdrawn = true;
    if (offer.inFlight > 0) await new Promise<void>((resolve) => (offer.drained = resolve));
  };
}

/** The offered capture of `tag`, held until `release` (the fork's children have loaded their state). */
export function useOfferedCapture(tag: string): { source: CaptureSource; release: () => void } | undefined {
  const offer = offers.get(tag);
  if (!offer) return undefined;
  offer.inFlight++;
  let released = false;
  return {
    source: offer.source,
    release: () => {
      if (released) return;
      released = true;
      offer.inFlight--;
      if (offer.inFlight === 0 && offer.withdrawn) offer.drained?.();
    },
  };
}

/** The snapshot a fork of `tag` restores: an offered capture's record, else the registered snapshot. */
export async function forkableSnapshot(tag: string): Promise<SnapshotInfo> {
  return offers.get(tag)?.source.snapshot ?? getSnapshot(tag);
}
