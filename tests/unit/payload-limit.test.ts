// The share of guest memory one call may hand the agent (files write, exec stdin).
import { checkGuestPayload, guestPayloadLimitBytes, isForkdError } from "@forkd/core";
import { describe, expect, it } from "vitest";

const MIB = 2 ** 20;

describe("guestPayloadLimitBytes", () => {
  it("is 1/32 of guest memory: below the ≈5 MiB that OOM-killed a 128 MiB guest's agent", () => {
    expect(guestPayloadLimitBytes(128)).toBe(4 * MIB);
    expect(guestPayloadLimitBytes(256)).toBe(8 * MIB);
    expect(guestPayloadLimitBytes(1024)).toBe(32 * MIB);
  });

  it("never goes under 1 MiB, and a memory size that is no number gets the floor", () => {
    expect(guestPayloadLimitBytes(16)).toBe(MIB);
    for (const bad of [0, -5, Number.NaN, Number.POSITIVE_INFINITY]) expect(guestPayloadLimitBytes(bad)).toBe(MIB);
  });
});

describe("checkGuestPayload", () => {
  it("lets the limit through and refuses one byte more as too_large (413) naming the limit and memory_mib", () => {
    expect(() => checkGuestPayload("stdin", 4 * MIB, 128)).not.toThrow();
    let caught: unknown;
    try {
      checkGuestPayload("stdin", 4 * MIB + 1, 128);
    } catch (err) {
      caught = err;
    }
    expect(isForkdError(caught, "too_large")).toBe(true);
    const err = caught as { httpStatus: number; message: string; details: Record<string, unknown> };
    expect(err.httpStatus).toBe(413);
    expect(err.message).toContain(`${4 * MIB} bytes`);
    expect(err.message).toMatch(/memory_mib/);
    expect(err.details).toEqual({ limit_bytes: 4 * MIB, bytes: 4 * MIB + 1, memory_mib: 128 });
  });
});
