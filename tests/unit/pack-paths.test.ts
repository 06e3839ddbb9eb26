// Where a TCP caller's pack may go: inside $FORKD_HOME/packs only (the token must
// not let its holder make root write or read any file on the host).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ForkdError } from "@forkd/core";
import { confinedPackPath, refuseSymlinkedComponents } from "@forkd/daemon";
import { describe, expect, it } from "vitest";

const DIR = "/var/lib/forkd/packs";

function refusal(fn: () => unknown): ForkdError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ForkdError);
    return err as ForkdError;
  }
  throw new Error("expected a refusal");
}

describe("confinedPackPath", () => {
  it("resolves a relative name inside the packs directory", () => {
    expect(confinedPackPath("base.forkd.tar.zst", DIR)).toBe(`${DIR}/base.forkd.tar.zst`);
    expect(confinedPackPath("./team/base.tar.zst", DIR)).toBe(`${DIR}/team/base.tar.zst`);
  });

  it("accepts an absolute path already inside it", () => {
    expect(confinedPackPath(`${DIR}/base.forkd.tar.zst`, DIR)).toBe(`${DIR}/base.forkd.tar.zst`);
  });

  it("refuses paths outside it, .. anywhere, the directory itself and NUL, naming the allowed directory", () => {
    for (const bad of [
      "/etc/cron.d/x",
      "/root/.ssh/authorized_keys",
      "../token",
      "a/../b",
      `${DIR}/../token`,
      `${DIR}-evil/x`,
      DIR,
      `${DIR}/`,
      ".",
      "",
      "a\0b",
    ]) {
      const err = refusal(() => confinedPackPath(bad, DIR));
      expect(err.code, bad).toBe("bad_request");
      expect(err.message).toContain(DIR);
      expect(err.details).toMatchObject({ allowed_dir: DIR });
    }
  });
});

describe("refuseSymlinkedComponents", () => {
  it("refuses a symlinked packs directory or a symlink inside it, and allows real files and names not there yet", () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-pack-paths-"));
    const dir = path.join(root, "packs");
    refuseSymlinkedComponents(path.join(dir, "new.tar.zst"), dir, "new.tar.zst");
    expect(fs.statSync(dir).mode & 0o777).toBe(0o700);
    fs.mkdirSync(path.join(dir, "sub"));
    fs.writeFileSync(path.join(dir, "sub", "real.tar.zst"), "");
    refuseSymlinkedComponents(path.join(dir, "sub", "real.tar.zst"), dir, "sub/real.tar.zst");

    fs.symlinkSync("/etc/passwd", path.join(dir, "link.tar.zst"));
    expect(refusal(() => refuseSymlinkedComponents(path.join(dir, "link.tar.zst"), dir, "link.tar.zst")).message).toMatch(/symlink/);
    fs.symlinkSync("/etc", path.join(dir, "etc"));
    expect(refusal(() => refuseSymlinkedComponents(path.join(dir, "etc", "x"), dir, "etc/x")).code).toBe("bad_request");

    const linkedDir = path.join(root, "linked-packs");
    fs.symlinkSync(root, linkedDir);
    expect(refusal(() => refuseSymlinkedComponents(path.join(linkedDir, "x"), linkedDir, "x")).message).toMatch(/symlink/);
    fs.rmSync(root, { recursive: true, force: true });
  });
});
