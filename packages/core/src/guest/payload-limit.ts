// How much one call may hand the guest agent at once (a files write, exec stdin,
// background-process stdin). The agent receives it as one base64 frame inside a JSON
// document and decodes it in memory, so a payload costs a few times its size in the
// guest's RAM: measured under TCG, a 128 MiB guest's agent was OOM-killed by a files
// write of about 6 MiB and by exec stdin of about 5 MiB, and the call then hung until
// its deadline. The limit is therefore a fixed share of guest memory, checked on the
// host before anything is sent.
import { ForkdError } from "../common/errors.js";

const MIB = 2 ** 20;
/** A payload may be at most this share of guest RAM: 128 MiB → 4 MiB, 256 MiB → 8 MiB. */
const GUEST_RAM_SHARE = 32;
/** No guest is offered less than this (a 32 MiB guest could not boot the agent anyway). */
const FLOOR_BYTES = 1 * MIB;

/** The largest payload (decoded bytes) one call may hand a guest of `memoryMib` MiB. */
export function guestPayloadLimitBytes(memoryMib: number): number {
  if (!Number.isFinite(memoryMib) || memoryMib <= 0) return FLOOR_BYTES;
  return Math.max(FLOOR_BYTES, Math.floor((memoryMib * MIB) / GUEST_RAM_SHARE));
}

/**
 * Refuses (too_large, 413) a payload the guest could not hold, before it reaches the
 * guest: an agent killed by the kernel's OOM killer would leave the call waiting.
 */
export function checkGuestPayload(what: string, bytes: number, memoryMib: number): void {
  const limit = guestPayloadLimitBytes(memoryMib);
  if (bytes <= limit) return;
  throw new ForkdError(
    "too_large",
    `${what} is ${bytes} bytes; a sandbox with ${memoryMib} MiB of guest memory takes at most ${limit} bytes in one call (1/${GUEST_RAM_SHARE} of its memory, at least ${FLOOR_BYTES}): send it in parts, or fork from a snapshot with more guest memory (memory_mib) to raise the limit`,
    { limit_bytes: limit, bytes, memory_mib: memoryMib },
  );
}
