// Root never follows a name in a dir a VMM can write: a QEMU that escaped its
// seccomp filter owns its runtime dir (and, while it runs, a materialiser or parent
// owns its memory dir), so whatever forkd reads, writes or chowns there may have
// been swapped for a symlink to a host file, a hard link to one, or a FIFO. Real
// files, real links, real launcher; as root, like forkd.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { keepFromVmms, keepLogs, launcherPath, readVmmFile, VMM_GID, VMM_UID_BASE, writeVmmFile } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const isRoot = process.geteuid?.() === 0;
let root: string;
let victim: string;
const SECRET = "root:$y$j9T$not-for-any-vmm:19000:0:99999:7:::\n";

function victimFacts() {
  const st = fs.statSync(victim);
  return { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, text: fs.readFileSync(victim, "utf8") };
}

beforeAll(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-vmm-owned-"));
  // A host file root owns and nobody else may read: what an escaped VMM points at.
  victim = path.join(root, "shadow");
  fs.writeFileSync(victim, SECRET, { mode: 0o640 });
  process.env.FORKD_RUN_DIR = path.join(root, "run");
});

afterAll(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

describe("reading and writing in a VMM's dir", () => {
  it("reads a plain file's tail, and nothing through a symlink, a hard link or a FIFO (without blocking)", async () => {
    const dir = fs.mkdtempSync(path.join(root, "vm-"));
    fs.writeFileSync(path.join(dir, "qemu.log"), "a".repeat(100) + "the end");
    expect((await readVmmFile(path.join(dir, "qemu.log"), 7))?.toString()).toBe("the end");
    fs.symlinkSync(victim, path.join(dir, "link"));
    expect(await readVmmFile(path.join(dir, "link"), 4096)).toBeUndefined();
    fs.linkSync(victim, path.join(dir, "hard"));
    expect(await readVmmFile(path.join(dir, "hard"), 4096)).toBeUndefined();
    spawnSync("mkfifo", [path.join(dir, "fifo")]);
    expect(await readVmmFile(path.join(dir, "fifo"), 4096)).toBeUndefined();
    expect(await readVmmFile(path.join(dir, "missing"), 4096)).toBeUndefined();
  });

  it("writes a fresh file where a symlink to a host file was, leaving that file as it was", async () => {
    const dir = fs.mkdtempSync(path.join(root, "vm-"));
    const before = victimFacts();
    fs.symlinkSync(victim, path.join(dir, "console.log"));
    await writeVmmFile(path.join(dir, "console.log"), "guest said hi");
    expect(victimFacts()).toEqual(before);
    expect(fs.lstatSync(path.join(dir, "console.log")).isFile()).toBe(true);
    expect(fs.readFileSync(path.join(dir, "console.log"), "utf8")).toBe("guest said hi");
  });

  it("keeps a failed VM's logs without copying what a swapped log names", async () => {
    const id = "sb-0123456789ab";
    const dir = path.join(root, "run", "vms", id);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fs.symlinkSync(victim, path.join(dir, "console.log"));
    fs.linkSync(victim, path.join(dir, "qemu.log"));
    const kept = await keepLogs(id, dir);
    expect(kept).toBeDefined();
    expect(fs.readFileSync(kept!, "utf8")).not.toContain("not-for-any-vmm");
    expect(fs.existsSync(path.join(root, "run", "logs", `${id}.qemu.log`))).toBe(false);
  });
});

describe.skipIf(!isRoot)("taking a memory image back from the VMM that wrote it", () => {
  it("chowns nothing a symlink or a hard link names, and refuses the image", () => {
    for (const swap of ["symlink", "hardlink"] as const) {
      const dir = fs.mkdtempSync(path.join(root, "stage-"));
      fs.chownSync(dir, VMM_UID_BASE + 5, VMM_GID);
      if (swap === "symlink") fs.symlinkSync(victim, path.join(dir, "memory.bin"));
      else fs.linkSync(victim, path.join(dir, "memory.bin"));
      const before = victimFacts();
      expect(() => keepFromVmms(path.join(dir, "memory.bin")), swap).toThrow(/not a plain file|cannot be opened/);
      expect(victimFacts(), swap).toEqual(before);
      // The dir is root's again all the same: the VMM can swap nothing more in it.
      expect(fs.statSync(dir).uid).toBe(0);
      expect(fs.statSync(dir).mode & 0o777).toBe(0o700);
    }
  });

  it("makes a plain image root's and read-only", () => {
    const dir = fs.mkdtempSync(path.join(root, "stage-"));
    const file = path.join(dir, "memory.bin");
    fs.writeFileSync(file, Buffer.alloc(4096));
    fs.chownSync(dir, VMM_UID_BASE + 5, VMM_GID);
    fs.chownSync(file, VMM_UID_BASE + 5, VMM_GID);
    keepFromVmms(file);
    const st = fs.statSync(file);
    expect([st.uid, st.mode & 0o777]).toEqual([0, 0o400]);
  });
});

describe.skipIf(!isRoot)("the migration copier's socket", () => {
  it("is born the VMM's (0600), so nothing is chowned by name in the VMM's dir", async () => {
    const uid = VMM_UID_BASE + 6;
    const dir = fs.mkdtempSync(path.join(root, "vm-"));
    fs.chownSync(dir, uid, VMM_GID);
    const socket = path.join(dir, "migrate-test.sock");
    const copier = spawn(launcherPath(), ["--listen-unix", socket, "--socket-owner", `${uid}:${VMM_GID}`, "--", "/bin/true"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    await new Promise<void>((resolve, reject) => {
      copier.stderr.on("data", (d: Buffer) => (d.toString().includes("ready") ? resolve() : reject(new Error(d.toString()))));
      copier.on("exit", (code) => reject(new Error(`launcher exited ${code}`)));
    });
    const st = fs.lstatSync(socket);
    expect(st.isSocket()).toBe(true);
    expect([st.uid, st.gid, st.mode & 0o777]).toEqual([uid, VMM_GID, 0o600]);
    copier.kill("SIGKILL");
  });
});
