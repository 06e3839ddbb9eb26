import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { guestAppend, inTree, planRestore, uuidFromDigest } from "@forkd/core";
import { bearer, isLoopback, parseListen, tokenMatches, validateToken } from "@forkd/daemon";
import { describe, expect, it } from "vitest";

describe("image roots never lead the builder out of the tree", () => {
  it("follows absolute and relative symlinks inside the root only", () => {
    const tree = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-tree-"));
    fs.mkdirSync(path.join(tree, "usr/bin"), { recursive: true });
    fs.symlinkSync("usr/bin", path.join(tree, "bin"));
    fs.symlinkSync("/etc", path.join(tree, "evil"));
    fs.symlinkSync("../../../../..", path.join(tree, "up"));
    expect(inTree(tree, "bin/busybox")).toBe(path.join(tree, "usr/bin/busybox"));
    expect(inTree(tree, "evil/passwd")).toBe(path.join(tree, "etc/passwd"));
    expect(inTree(tree, "up/etc/shadow")).toBe(path.join(tree, "etc/shadow"));
    expect(inTree(tree, "../../etc/passwd")).toBe(path.join(tree, "etc/passwd"));
    fs.mkdirSync(path.join(tree, "var/tmp"), { recursive: true });
    fs.symlinkSync("/var/tmp", path.join(tree, "tmp"));
    expect(inTree(tree, "tmp", { followLast: true })).toBe(path.join(tree, "var/tmp"));
    fs.symlinkSync("/self", path.join(tree, "self"));
    expect(() => inTree(tree, "self", { followLast: true })).toThrow(/too many symlinks/);
    expect(inTree(tree, "evil", { followLast: true })).toBe(path.join(tree, "etc"));
    expect(inTree(tree, "evil")).toBe(path.join(tree, "evil"));
    fs.symlinkSync("loop", path.join(tree, "loop"));
    expect(() => inTree(tree, "loop/x")).toThrow(/too many symlinks/);
    fs.rmSync(tree, { recursive: true, force: true });
  });

  it("derives the filesystem identity from the image digest", () => {
    expect(uuidFromDigest("0123456789abcdef0123456789abcdef0123")).toMatch(
      /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-8[0-9a-f]{3}-[0-9a-f]{12}$/,
    );
  });
});

describe("daemon auth rules", () => {
  it("refuses short and placeholder tokens without echoing them", () => {
    expect(() => validateToken("short", "f")).toThrow(/shorter than 16 bytes/);
    expect(() => validateToken("changeme-changeme-changeme", "f")).toThrow(/placeholder/);
    expect(() => validateToken("aaaaaaaaaaaaaaaaaaaaaaaa", "f")).toThrow(/placeholder/);
    try {
      validateToken("changeme-secret-value", "f");
    } catch (err) {
      expect((err as Error).message).not.toContain("changeme-secret-value");
    }
    expect(validateToken("  k3J9xQ2mZ7pL4vB8nR1t  \n", "f")).toBe("k3J9xQ2mZ7pL4vB8nR1t");
  });

  it("compares tokens whatever their length and parses bearer headers strictly", () => {
    expect(tokenMatches("k3J9xQ2mZ7pL4vB8nR1t", "k3J9xQ2mZ7pL4vB8nR1t")).toBe(true);
    expect(tokenMatches("k3J9xQ2mZ7pL4vB8nR1t", "k3J9xQ2mZ7pL4vB8nR1")).toBe(false);
    expect(tokenMatches("k3J9xQ2mZ7pL4vB8nR1t", undefined)).toBe(false);
    expect(bearer("Bearer abc")).toBe("abc");
    expect(bearer("bearer abc")).toBe("abc");
    expect(bearer("Basic abc")).toBeUndefined();
    expect(bearer("Bearer a b")).toBeUndefined();
  });

  it("knows loopback from the rest and parses listen addresses", () => {
    expect(isLoopback("127.0.0.1")).toBe(true);
    expect(isLoopback("::1")).toBe(true);
    expect(isLoopback("0.0.0.0")).toBe(false);
    expect(isLoopback("10.0.0.1")).toBe(false);
    expect(parseListen("127.0.0.1:8889")).toEqual({ host: "127.0.0.1", port: 8889 });
    expect(parseListen("[::1]:80")).toEqual({ host: "::1", port: 80 });
    expect(() => parseListen("nope")).toThrow(/HOST:PORT/);
  });
});

describe("guest and restore planning", () => {
  const cpuinfo = "cpu MHz\t\t: 2599.998\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
  it("tells a TCG guest the host's TSC rate, and leaves KVM alone", () => {
    expect(guestAppend("tcg", cpuinfo, "")).toContain("tsc_early_khz=2599998 tsc=reliable");
    expect(guestAppend("kvm", cpuinfo, "")).not.toContain("tsc_early_khz");
    expect(guestAppend("tcg", "flags\t: fpu\n", "")).not.toContain("tsc_early_khz");
  });

  it("keeps a snapshot's NIC in every restore, isolated when the child asks for no network", () => {
    const snapshot = {
      accel: "tcg" as const,
      memoryMib: 256,
      vcpus: 1,
      image: { rootfs: "/r", name: "base", digest: "d", kernel: "k", initrd: "i" },
      network: true,
    };
    const memory = { kind: "file" as const, path: "/m", share: false };
    expect(planRestore(snapshot, { runDir: "/x", memory, network: false }).network).toBe("isolated");
    expect(planRestore(snapshot, { runDir: "/x", memory, network: true }).network).toBe("user");
    expect(planRestore({ ...snapshot, network: false }, { runDir: "/x", memory, network: true }).network).toBe("none");
    expect(planRestore(snapshot, { runDir: "/x", memory, network: true, startPaused: true }).startPaused).toBe(true);
  });
});
