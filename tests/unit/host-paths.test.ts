import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ensurePrivateDir, ForkdError, parentDirVerdict, privateDirVerdict } from "@forkd/core";
import { afterAll, describe, expect, it } from "vitest";

const dir = (mode: number, uid = 0, extra: Partial<{ isDirectory: boolean; isSymbolicLink: boolean }> = {}) => ({
  uid,
  mode: 0o040000 | mode,
  isDirectory: true,
  isSymbolicLink: false,
  ...extra,
});

describe("forkd's own directories: the verdict from owner and mode", () => {
  it("accepts a directory of ours that only we can write", () => {
    for (const mode of [0o700, 0o711, 0o750, 0o755]) expect(privateDirVerdict("/d", dir(mode), 0)).toEqual({ ok: true });
    expect(privateDirVerdict("/d", dir(0o700, 1000), 1000)).toEqual({ ok: true });
  });

  it("refuses group or world write, naming the mode and the fix", () => {
    const world = privateDirVerdict("/var/lib/forkd", dir(0o777), 0);
    expect(world).toMatchObject({ ok: false, problem: "has mode 0777: anyone can write it" });
    expect(world.ok || world.fix).toMatch(/chmod go-w \/var\/lib\/forkd/);
    expect(privateDirVerdict("/d", dir(0o770), 0)).toMatchObject({ ok: false, problem: "has mode 0770: its group can write it" });
    // The sticky bit protects names in a shared dir, not forkd's files from its writers.
    expect(privateDirVerdict("/d", dir(0o1777), 0).ok).toBe(false);
  });

  it("refuses another user's directory, a symlink and a non-directory", () => {
    const theirs = privateDirVerdict("/run/forkd", dir(0o700, 65534), 0);
    expect(theirs).toMatchObject({ ok: false, problem: "is owned by uid 65534, not by forkd's uid 0" });
    expect(theirs.ok || theirs.fix).toMatch(/chown 0 \/run\/forkd/);
    expect(privateDirVerdict("/d", dir(0o777, 0, { isSymbolicLink: true, isDirectory: false }), 0)).toMatchObject({
      ok: false,
      problem: expect.stringMatching(/^is a symlink/),
    });
    expect(privateDirVerdict("/d", dir(0o600, 0, { isDirectory: false }), 0)).toMatchObject({ ok: false, problem: "is not a directory" });
  });

  it("lets a parent be world-writable only with the sticky bit, and owned by root or us", () => {
    expect(parentDirVerdict("/dev/shm", dir(0o1777), 0)).toEqual({ ok: true });
    expect(parentDirVerdict("/tmp/x", dir(0o777), 0)).toMatchObject({ ok: false, problem: expect.stringMatching(/no sticky bit/) });
    expect(parentDirVerdict("/home/a", dir(0o755, 1000), 1000)).toEqual({ ok: true });
    expect(parentDirVerdict("/home/b", dir(0o755, 1001), 1000)).toMatchObject({ ok: false, problem: "is owned by uid 1001" });
  });
});

describe("ensurePrivateDir on a real filesystem", () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-dirs-"));
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

  it("creates missing directories with the mode asked for, whatever the umask", () => {
    const old = process.umask(0o000);
    try {
      const made = ensurePrivateDir(path.join(root, "a", "state"));
      expect(fs.statSync(made).mode & 0o7777).toBe(0o700);
      expect(fs.statSync(ensurePrivateDir(path.join(root, "b"), { mode: 0o711 })).mode & 0o7777).toBe(0o711);
    } finally {
      process.umask(old);
    }
  });

  it("refuses an existing directory others can write, another user's, and a symlink, with a ForkdError", () => {
    const open = path.join(root, "open");
    fs.mkdirSync(open);
    fs.chmodSync(open, 0o777);
    const err = (() => {
      try {
        ensurePrivateDir(open, { kind: "runtime dir (FORKD_RUN_DIR)" });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ForkdError);
    expect((err as ForkdError).code).toBe("unsafe_path");
    expect((err as Error).message).toBe(
      `forkd's runtime dir (FORKD_RUN_DIR) ${open} has mode 0777: anyone can write it; fix: chmod go-w ${open} (forkd creates its directories 0700), or choose another directory`,
    );
    // Refused, not repaired: the mode stays what the user set.
    expect(fs.statSync(open).mode & 0o7777).toBe(0o777);

    if (process.geteuid?.() === 0) {
      const theirs = path.join(root, "theirs");
      fs.mkdirSync(theirs, { mode: 0o700 });
      fs.chownSync(theirs, 65534, 65534);
      expect(() => ensurePrivateDir(theirs)).toThrow(/is owned by uid 65534/);
    }
    const link = path.join(root, "link");
    fs.symlinkSync(path.join(root, "a"), link);
    expect(() => ensurePrivateDir(link)).toThrow(/is a symlink/);
    // Beneath a world-writable parent without the sticky bit, even a private dir is refused.
    fs.mkdirSync(path.join(open, "inner"), { mode: 0o700 });
    expect(() => ensurePrivateDir(path.join(open, "inner"))).toThrow(`parent ${open} has mode 0777`);
  });
});
