// Live capture (BRANCH and fork-to-many), the pure parts: finding the guest RAM in a VMM's memory map,
// which sources can be captured, splicing a child's device state after its snapshot's RAM setup, and
// the offer that lets forks use a capture before it is registered.
import {
  deviceSplice,
  ForkdError,
  findGuestRam,
  judgeGuestRam,
  offerCapture,
  ramSectionId,
  type SnapshotInfo,
  spliceDevices,
  useOfferedCapture,
} from "@forkd/core";
import { describe, expect, it } from "vitest";

const MIB = 2 ** 20;

const be32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};
const be64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const name = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]);
const HEADER = Buffer.concat([be32(0x5145564d), be32(3)]);

function section(id: number, idstr: string, version: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([0x04]), be32(id), name(idstr), be32(0), be32(version), body, Buffer.from([0x7e]), be32(id)]);
}

/** A stream shaped like a snapshot's vmstate.bin: configuration, RAM setup with a ROM page, two devices. */
function snapshotStream(memoryBytes: number, timerBody = Buffer.from("parent-timer")): Buffer {
  const config = Buffer.concat([Buffer.from([0x07]), be32(7), Buffer.from("microvm")]);
  const ramStart = Buffer.concat([
    Buffer.from([0x01]),
    be32(2),
    name("ram"),
    be32(0),
    be32(4),
    be64(memoryBytes + 4096 + 0x04),
    name("mem"),
    be64(memoryBytes),
    be64(0),
    name("/rom@etc/acpi/tables"),
    be64(4096),
    be64(0),
    be64(0x10),
    Buffer.from([0x7e]),
    be32(2),
  ]);
  const ramEnd = Buffer.concat([Buffer.from([0x03]), be32(2), be64(0x10), Buffer.from([0x7e]), be32(2)]);
  return Buffer.concat([
    HEADER,
    config,
    ramStart,
    ramEnd,
    section(0, "timer", 2, timerBody),
    section(3, "cpu", 12, Buffer.from("parent-cpu")),
    Buffer.from([0x00]),
  ]);
}

function devicesStream(first = "timer"): Buffer {
  return Buffer.concat([
    HEADER,
    section(0, first, 2, Buffer.from("child-timer")),
    section(3, "cpu", 12, Buffer.from("child-cpu")),
    Buffer.from([0x00]),
  ]);
}

describe("splicing a child's device state", () => {
  it("finds the RAM section and checks its block is the guest's size", () => {
    expect(ramSectionId(snapshotStream(256 * MIB), 256 * MIB)).toBe(2);
    expect(() => ramSectionId(snapshotStream(256 * MIB), 128 * MIB)).toThrow(/block mem is 268435456 bytes, not the guest's 134217728/);
    expect(() => ramSectionId(Buffer.from("not a stream at all"), 256 * MIB)).toThrow(ForkdError);
  });

  it("puts the child's device sections where the snapshot's start, keeping configuration and RAM setup", () => {
    const snapshot = snapshotStream(256 * MIB);
    const devices = devicesStream();
    const at = deviceSplice(snapshot, devices);
    expect(snapshot[at]).toBe(0x04);
    expect(snapshot.subarray(at + 6, at + 11).toString()).toBe("timer");
    const spliced = spliceDevices(snapshot, devices);
    expect(spliced.subarray(0, at).equals(snapshot.subarray(0, at))).toBe(true);
    expect(spliced.subarray(at).equals(devices.subarray(8))).toBe(true);
    expect(spliced.includes(Buffer.from("parent-timer"))).toBe(false);
    expect(spliced.includes(Buffer.from("child-cpu"))).toBe(true);
  });

  it("refuses device state it cannot place: another machine's devices, or not a stream", () => {
    const snapshot = snapshotStream(256 * MIB);
    expect(() => deviceSplice(snapshot, devicesStream("pit"))).toThrow(/no device section 'pit' where devices start/);
    expect(() => deviceSplice(snapshot, Buffer.concat([HEADER, Buffer.from([0x00])]))).toThrow(/does not start with a device section/);
    expect(() => deviceSplice(snapshot, Buffer.from("QEVM"))).toThrow(/not a QEMU migration stream/);
    // The header must follow a section footer: the same bytes inside a ROM page are not a device section.
    const decoy = devicesStream();
    const fake = Buffer.concat([snapshot.subarray(0, 40), Buffer.from([0x55]), decoy.subarray(8, 8 + 19)]);
    expect(() => deviceSplice(fake, decoy)).toThrow(/no device section 'timer'/);
  });
});

describe("the guest RAM in a VMM's memory map", () => {
  const maps = [
    "55d0c0a00000-55d0c0e00000 r-xp 00000000 fe:01 1234   /usr/bin/qemu-system-x86_64",
    "7f0000000000-7f0010000000 rw-p 00000000 00:1b 547    /dev/shm/forkd/images/base@0123456789abcdef/memory.bin",
    "7f0010000000-7f0010200000 rw-p 00000000 00:00 0 ",
    "7f0020000000-7f0030000000 rw-s 00000000 00:1b 999    /dev/shm/forkd/images/other@0123456789abcdef/memory.bin",
  ].join("\n");

  it("is the one private mapping of the guest's size backed by a memory image", () => {
    expect(findGuestRam(maps, 256)).toEqual({
      start: 0x7f0000000000,
      pages: 65536,
      path: "/dev/shm/forkd/images/base@0123456789abcdef/memory.bin",
      inode: 547,
      deleted: false,
    });
    expect(findGuestRam(maps, 128)).toBeUndefined();
  });

  it("notices an image replaced since it was mapped, and refuses to guess between two", () => {
    const replaced = maps.replace("memory.bin\n7f0010000000", "memory.bin (deleted)\n7f0010000000");
    expect(findGuestRam(replaced, 256)).toMatchObject({ deleted: true, path: "/dev/shm/forkd/images/base@0123456789abcdef/memory.bin" });
    const twice = `${maps}\n7f0040000000-7f0050000000 rw-p 00000000 00:1b 548    /dev/shm/forkd/images/x@0123456789abcdef/memory.bin`;
    expect(findGuestRam(twice, 256)).toBeUndefined();
  });

  it("reads a sealed staged image (a memfd named after its stage key) as that key's staged file; a name that is no key is not guest RAM", () => {
    const sealed = maps.replace(
      "/dev/shm/forkd/images/base@0123456789abcdef/memory.bin\n",
      "/memfd:forkd-staged-image:base@0123456789abcdef (deleted)\n",
    );
    expect(findGuestRam(sealed, 256, "/dev/shm/forkd/images")).toEqual({
      start: 0x7f0000000000,
      pages: 65536,
      path: "/dev/shm/forkd/images/base@0123456789abcdef/memory.bin",
      inode: 547,
      deleted: false,
    });
    expect(findGuestRam(sealed.replace("base@0123", "../x@0123"), 256, "/dev/shm/forkd/images")).toBeUndefined();
  });
});

describe("which sources can be captured live (judgeGuestRam)", () => {
  const imagesDir = "/dev/shm/forkd/images";
  const ram = (file: string, over: Partial<{ inode: number; deleted: boolean }> = {}) => ({
    start: 0x7f0000000000,
    pages: 65536,
    path: file,
    inode: 42,
    deleted: false,
    ...over,
  });
  const staged = `${imagesDir}/base@0123456789abcdef/memory.bin`;
  const opts = { memoryMib: 256, imagesDir, snapshotKey: "base@0123456789abcdef", currentInode: 42 };

  it("captures a child of a staged image as it is", () => {
    expect(judgeGuestRam(ram(staged), opts)).toEqual({ ok: true, restage: false });
  });

  it("stages the image again when it was evicted or replaced since the restore (same digest, same bytes)", () => {
    expect(judgeGuestRam(ram(staged, { deleted: true }), opts)).toEqual({ ok: true, restage: true });
    expect(judgeGuestRam(ram(staged), { ...opts, currentInode: 7 })).toEqual({ ok: true, restage: true });
    expect(judgeGuestRam(ram(staged), { ...opts, currentInode: undefined })).toEqual({ ok: true, restage: true });
  });

  it("refuses, saying why and what to do, a VMM with no memory-image mapping (a cold boot)", () => {
    const verdict = judgeGuestRam(undefined, opts);
    expect(verdict).toMatchObject({ ok: false, why: expect.stringMatching(/not restored from a staged snapshot.*mode diff or full/) });
  });

  it("refuses a mapping that is not a staged image, or whose snapshot is gone", () => {
    expect(judgeGuestRam(ram("/var/lib/forkd/snapshots/base/memory.bin"), opts)).toMatchObject({
      ok: false,
      why: expect.stringMatching(/not a staged snapshot image.*mode diff or full/),
    });
    expect(judgeGuestRam(ram(`${imagesDir}/sub/base@0123456789abcdef/memory.bin`), opts)).toMatchObject({ ok: false });
    expect(judgeGuestRam(ram(staged), { ...opts, snapshotKey: undefined })).toMatchObject({
      ok: false,
      why: expect.stringMatching(/no longer registered/),
    });
    expect(judgeGuestRam(ram(staged), { ...opts, snapshotKey: "base@fedcba9876543210" })).toMatchObject({ ok: false });
  });
});

describe("captures offered to forks before they are registered", () => {
  const source = (tag: string) => ({ snapshot: { tag } as SnapshotInfo, memoryPath: `/dev/shm/x/${tag}/memory.bin` });

  it("serves a fork of the tag until withdrawn, and withdrawing waits for forks still loading it", async () => {
    const withdraw = offerCapture("offered-a", source("offered-a"));
    const use = useOfferedCapture("offered-a");
    expect(use?.source.memoryPath).toBe("/dev/shm/x/offered-a/memory.bin");
    expect(useOfferedCapture("offered-b")).toBeUndefined();
    let withdrawn = false;
    const done = withdraw().then(() => (withdrawn = true));
    // No new fork gets it once withdrawal began; the one in flight still holds it.
    expect(useOfferedCapture("offered-a")).toBeUndefined();
    await new Promise((r) => setTimeout(r, 20));
    expect(withdrawn).toBe(false);
    use!.release();
    use!.release();
    await done;
    expect(withdrawn).toBe(true);
  });

  it("a second offer of the same tag is not withdrawn by the first one's withdrawal", async () => {
    const first = offerCapture("offered-c", source("offered-c"));
    await first();
    const second = offerCapture("offered-c", { ...source("offered-c"), memoryPath: "/second" });
    await first();
    const use = useOfferedCapture("offered-c");
    expect(use?.source.memoryPath).toBe("/second");
    use?.release();
    await second();
    expect(useOfferedCapture("offered-c")).toBeUndefined();
  });
});
