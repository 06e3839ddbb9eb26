import { isStrayTempName } from "@forkd/core";
import { describe, expect, it } from "vitest";

describe("cleanup recognises only forkd's own temp names", () => {
  it("matches the temp dirs forkd writes, with the writer's pid", () => {
    expect(isStrayTempName("snapshots", ".tmp-4242-0123abcd")).toBe(4242);
    expect(isStrayTempName("snapshots", ".rm-7-deadbeef")).toBe(7);
    expect(isStrayTempName("staged", ".tmp-99-0123abcd")).toBe(99);
    expect(isStrayTempName("staged", "warm@0123456789abcdef.tmp-1234-0123abcd")).toBe(1234);
  });

  it("never matches a valid tag that merely looks like one", () => {
    for (const name of ["prod.tmp-4000000-ab", "x.tmp-1-0123abcd", "tmp-1-0123abcd", "a.rm-2-deadbeef", ".tmp-1-0123abcd.bak"]) {
      expect(isStrayTempName("snapshots", name), name).toBeUndefined();
    }
    for (const name of ["prod.tmp-4000000-ab@0123456789abcdef", "prod.tmp-4000000-ab", "warm@0123456789abcdef"]) {
      expect(isStrayTempName("staged", name), name).toBeUndefined();
    }
  });
});
