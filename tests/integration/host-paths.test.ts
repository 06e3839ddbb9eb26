// The host's paths stay forkd's: image builds never write through a root's
// symlinks, forkd refuses directories others control, and a staged memory image
// that was tampered with never reaches a child. Real builds, real VMs.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { connectSandbox, forkSandboxes, getSnapshot, killSandbox, stagedPath } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");

function forkd(args: string[], extraEnv: Record<string, string> = {}, timeoutMs = 300_000) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: timeoutMs, env: { ...process.env, ...extraEnv } });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

/** Content (or listing) and mode of every host path, to prove a build left them alone. */
function hostState(paths: string[]): Record<string, { mode: number; content: string }> {
  const out: Record<string, { mode: number; content: string }> = {};
  for (const p of paths) {
    const st = fs.lstatSync(p);
    out[p] = {
      mode: st.mode,
      // A digest, not the bytes: a target overwritten with node would make a 100 MiB diff.
      content: st.isDirectory()
        ? fs.readdirSync(p).sort().join(",")
        : createHash("sha256").update(fs.readFileSync(p)).digest("hex").slice(0, 16),
    };
  }
  return out;
}

/** A file's type and size inside an ext4 image, read with debugfs (no mount, no guest). */
function statInImage(rootfs: string, file: string): { type: string; size: number } {
  const stat = spawnSync("debugfs", ["-R", `stat ${file}`, rootfs], { encoding: "utf8" });
  const type = /Type: (\S+)/.exec(stat.stdout)?.[1] ?? `missing (${stat.stderr.trim()})`;
  return { type, size: Number(/Size: (\d+)/.exec(stat.stdout)?.[1] ?? -1) };
}

/** Type and content of a small file in an ext4 image. */
function inImage(rootfs: string, file: string): { type: string; content: string } {
  const cat = spawnSync("debugfs", ["-R", `cat ${file}`, rootfs], { encoding: "utf8" });
  return { type: statInImage(rootfs, file).type, content: cat.stdout };
}

describe("image builds never write through a root's symlinks", () => {
  const dir = fs.mkdtempSync(path.join(env.runDir, "img-"));
  // Not under /tmp: a root whose /tmp links to a path under /tmp is a loop (refused as one), not a test of the host's files.
  let host = "";
  const ownEnv = { FORKD_HOME: path.join(dir, "home") };

  function hostFile(name: string, content: string, mode: number): string {
    const p = path.join(host, name);
    fs.writeFileSync(p, content);
    fs.chmodSync(p, mode);
    return p;
  }
  function hostDir(name: string, mode: number, files: string[] = []): string {
    const p = path.join(host, name);
    fs.mkdirSync(p, { recursive: true });
    for (const f of files) fs.writeFileSync(path.join(p, f), `${f}\n`);
    fs.chmodSync(p, mode);
    return p;
  }
  function tarOf(name: string, build: (root: string) => void): string {
    const root = path.join(dir, name);
    fs.mkdirSync(root);
    build(root);
    const tar = path.join(dir, `${name}.tar`);
    expect(spawnSync("tar", ["-C", root, "-cf", tar, "."]).status).toBe(0);
    return tar;
  }
  function build(name: string, tar: string) {
    return forkd(["image", "build", "--name", name, "--from-tar", tar], ownEnv);
  }
  function rootfsOf(name: string): string {
    const manifest = JSON.parse(fs.readFileSync(path.join(ownEnv.FORKD_HOME, "images", name, "current.json"), "utf8"));
    // Records name their files relative to the build's dir (older ones, absolutely).
    return path.resolve(ownEnv.FORKD_HOME, "images", name, manifest.digest, manifest.rootfs);
  }

  // Made in a hook, not at collection, so a run that filters these tests out leaves nothing in /var/tmp.
  beforeAll(() => {
    host = fs.mkdtempSync("/var/tmp/forkd-host-");
  });
  afterAll(() => fs.rmSync(host, { recursive: true, force: true }));

  it("replaces symlinked files and follows symlinked dirs inside the root, leaving their host targets untouched", () => {
    const targets = [
      hostFile("node-target", "host node\n", 0o640),
      hostFile("agent-target", "host agent\n", 0o600),
      hostFile("resolv-target", "nameserver 192.0.2.1\n", 0o644),
      hostFile("hostname-target", "host-name\n", 0o600),
      hostFile("passwd-target", "host:x:0:0::/:/bin/sh\n", 0o600),
      hostFile("busybox-target", "host busybox\n", 0o755),
      hostDir("libdir", 0o750, ["keep.so"]),
      hostDir("tmpdir", 0o755),
      hostDir("rootdir", 0o755),
      hostDir("sbindir", 0o750),
    ];
    const before = hostState(targets);
    const tar = tarOf("links", (root) => {
      fs.mkdirSync(path.join(root, "opt/forkd/bin"), { recursive: true });
      fs.mkdirSync(path.join(root, "etc"));
      fs.mkdirSync(path.join(root, "usr/bin"), { recursive: true });
      fs.mkdirSync(path.join(root, "bin"));
      fs.symlinkSync(path.join(host, "node-target"), path.join(root, "opt/forkd/bin/node.bin"));
      fs.symlinkSync(path.join(host, "agent-target"), path.join(root, "opt/forkd/agent.js"));
      fs.symlinkSync(path.join(host, "libdir"), path.join(root, "opt/forkd/lib"));
      fs.symlinkSync(path.join(host, "resolv-target"), path.join(root, "etc/resolv.conf"));
      // Relative, climbing far above the root.
      fs.symlinkSync(`../../../../../../../../..${host}/hostname-target`, path.join(root, "etc/hostname"));
      fs.symlinkSync(path.join(host, "passwd-target"), path.join(root, "etc/passwd"));
      fs.symlinkSync(path.join(host, "busybox-target"), path.join(root, "bin/busybox"));
      fs.symlinkSync(path.join(host, "tmpdir"), path.join(root, "tmp"));
      fs.symlinkSync(path.join(host, "rootdir"), path.join(root, "root"));
      fs.symlinkSync(path.join(host, "sbindir"), path.join(root, "usr/sbin"));
      // The host has this python; the root does not, whatever its link says.
      fs.symlinkSync(fs.realpathSync("/usr/bin/python3"), path.join(root, "usr/bin/python3"));
    });
    const res = build("links", tar);
    expect(res.code, res.stderr).toBe(0);
    expect(hostState(targets)).toEqual(before);

    const rootfs = rootfsOf("links");
    const node = statInImage(rootfs, "/opt/forkd/bin/node.bin");
    expect(node.type).toBe("regular");
    // The host's node, stripped: tens of MiB, not the 10 bytes of the host file the link pointed at.
    expect(node.size).toBeGreaterThan(10 * 2 ** 20);
    expect(statInImage(rootfs, "/opt/forkd/agent.js").type).toBe("regular");
    expect(statInImage(rootfs, "/opt/forkd/lib").type).toBe("directory");
    expect(statInImage(rootfs, "/opt/forkd/lib/ld-linux-x86-64.so.2").type).toBe("regular");
    expect(inImage(rootfs, "/etc/resolv.conf")).toEqual({ type: "regular", content: "nameserver 10.0.2.3\n" });
    expect(inImage(rootfs, "/etc/hostname")).toEqual({ type: "regular", content: "forkd\n" });
    expect(inImage(rootfs, "/etc/passwd").content).toMatch(/^root:x:0:0:root:/);
    // The root's busybox link is replaced by forkd's own, not written through.
    expect(statInImage(rootfs, "/bin/busybox")).toMatchObject({ type: "regular", size: fs.statSync("/bin/busybox").size });
    // Directory links stay links in the image; what forkd made went where they lead inside the root.
    expect(statInImage(rootfs, "/tmp").type).toBe("symlink");
    expect(statInImage(rootfs, `${host}/tmpdir`).type).toBe("directory");
    const manifest = JSON.parse(fs.readFileSync(path.join(ownEnv.FORKD_HOME, "images", "links", "current.json"), "utf8"));
    expect(manifest.runtimes).toEqual(["javascript"]);
    // And the guest boots on forkd's own files.
    const run = forkd(["run", "--image", "links", "--accel", "tcg", "--", "cat", "/etc/resolv.conf"], ownEnv);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toBe("nameserver 10.0.2.3\n");
  });

  it("replaces a symlinked /opt/forkd with a directory of forkd's own files", () => {
    const target = hostDir("forkd-target", 0o700, ["marker"]);
    fs.mkdirSync(path.join(target, "bin"));
    fs.writeFileSync(path.join(target, "bin/node.bin"), "host node\n");
    const tracked = [target, path.join(target, "marker"), path.join(target, "bin"), path.join(target, "bin/node.bin")];
    const before = hostState(tracked);
    const tar = tarOf("optlink", (root) => {
      fs.mkdirSync(path.join(root, "opt"));
      fs.symlinkSync(target, path.join(root, "opt/forkd"));
    });
    const res = build("optlink", tar);
    expect(res.code, res.stderr).toBe(0);
    expect(hostState(tracked)).toEqual(before);
    const rootfs = rootfsOf("optlink");
    expect(statInImage(rootfs, "/opt/forkd").type).toBe("directory");
    expect(statInImage(rootfs, "/opt/forkd/bin/node.bin").size).toBeGreaterThan(10 * 2 ** 20);
    expect(statInImage(rootfs, "/opt/forkd/marker").type).toMatch(/^missing/);
  });

  it("builds the busybox base into a fresh store, whose home it makes 0700, and boots it", () => {
    const fresh = { FORKD_HOME: path.join(dir, "fresh-home") };
    const res = forkd(["image", "build", "--name", "base"], fresh);
    expect(res.code, res.stderr).toBe(0);
    expect(fs.statSync(fresh.FORKD_HOME).mode & 0o7777).toBe(0o700);
    const run = forkd(["run", "--accel", "tcg", "--", "cat", "/etc/hostname"], fresh);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toBe("forkd\n");
  });

  it("fails with a clear error when the root has a file where forkd needs a directory", () => {
    const tar = tarOf("optfile", (root) => fs.writeFileSync(path.join(root, "opt"), "not a dir\n"));
    const res = build("optfile", tar);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain("the image root cannot take forkd's /opt: /opt is not a directory");
  });
});

describe("forkd's own directories", () => {
  it("refuses a state dir anyone can write, naming it, its mode and the fix", () => {
    const home = fs.mkdtempSync(path.join(env.runDir, "home-open-"));
    fs.chmodSync(home, 0o777);
    const res = forkd(["ls"], { FORKD_HOME: home });
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain(
      `forkd's state dir (FORKD_HOME) ${home} has mode 0777: anyone can write it; fix: chmod go-w ${home} (forkd creates its directories 0700), or choose another directory`,
    );
    expect(fs.existsSync(path.join(home, "forkd.db"))).toBe(false);
  });

  it("refuses a runtime dir another user owns before any VM starts", () => {
    const runDir = fs.mkdtempSync(path.join(env.runDir, "run-theirs-"));
    fs.chownSync(runDir, 65534, 65534);
    const res = forkd(["run", "--accel", "tcg", "--", "true"], { FORKD_RUN_DIR: runDir });
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain(
      `forkd's runtime dir (FORKD_RUN_DIR) ${runDir} is owned by uid 65534, not by forkd's uid 0; fix: chown 0 ${runDir}`,
    );
    expect(qemuPidsUnder(runDir)).toEqual([]);
  });

  it("creates the dirs it needs 0700", () => {
    const runDir = path.join(env.runDir, "fresh-run");
    const home = path.join(env.runDir, "fresh-home");
    expect(forkd(["ls"], { FORKD_HOME: home, FORKD_RUN_DIR: runDir }).code).toBe(0);
    expect(fs.statSync(home).mode & 0o7777).toBe(0o700);
  });
});

describe("a tampered staged memory image never reaches a child", () => {
  const TAG = "tamper";
  const ORIGINAL = "ORIGINAL-7f3a9c1e5b";
  const TAMPERED = "TAMPERED-7f3a9c1e5b";

  beforeAll(() => {
    // Built at run time so the marker is one string in the guest heap, not also in the source text.
    const res = forkd(["snapshot", "--tag", TAG, "--warm-eval", `globalThis.marker = ["ORIGINAL", "7f3a9c1e5b"].join("-")`]);
    expect(res.code, res.stderr).toBe(0);
  });
  afterAll(() => {
    forkd(["kill", "--all"]);
  });

  /** Rewrite every copy of the marker in place, keeping the inode and putting the mtime back. */
  function tamper(file: string): number {
    const before = fs.statSync(file);
    const bytes = fs.readFileSync(file);
    const fd = fs.openSync(file, "r+");
    let count = 0;
    try {
      for (let at = bytes.indexOf(ORIGINAL); at >= 0; at = bytes.indexOf(ORIGINAL, at + 1)) {
        fs.writeSync(fd, Buffer.from(TAMPERED), 0, TAMPERED.length, at);
        count++;
      }
    } finally {
      fs.closeSync(fd);
    }
    fs.utimesSync(file, before.atime, before.mtime);
    expect(fs.statSync(file).ino).toBe(before.ino);
    return count;
  }

  async function markerOf(id: string): Promise<unknown> {
    const agent = await connectSandbox(id);
    try {
      return (await agent.eval("marker")).value;
    } finally {
      agent.close();
    }
  }

  it("is detected in this process (verified once, then checked by inode, size and times) and restaged", async () => {
    const snapshot = await getSnapshot(TAG);
    const staged = stagedPath(snapshot);
    const [first] = await forkSandboxes({ tag: TAG, n: 1 });
    expect(first?.ok).toBe(true);
    expect(await markerOf(first!.id)).toBe(ORIGINAL);
    await killSandbox(first!.id);

    expect(tamper(staged)).toBeGreaterThan(0);
    expect(fs.readFileSync(staged).includes(TAMPERED)).toBe(true);
    const [child] = await forkSandboxes({ tag: TAG, n: 1 });
    expect(child?.ok, JSON.stringify(child)).toBe(true);
    expect(await markerOf(child!.id)).toBe(ORIGINAL);
    // Replaced from the durable store, not used as it was.
    expect(fs.readFileSync(staged).includes(TAMPERED)).toBe(false);
    await killSandbox(child!.id);
  });

  it("is detected by a fresh forkd process (which hashes the staged image on first use)", async () => {
    const staged = stagedPath(await getSnapshot(TAG));
    expect(tamper(staged)).toBeGreaterThan(0);
    const res = forkd(["fork", "--tag", TAG, "-n", "1", "--json"]);
    expect(res.code, res.stderr).toBe(0);
    const [child] = JSON.parse(res.stdout) as { id: string; ok: boolean }[];
    expect(child?.ok).toBe(true);
    expect(await markerOf(child!.id)).toBe(ORIGINAL);
    forkd(["kill", child!.id]);
  });

  it("refuses to fork when the durable copy was tampered with too", () => {
    const snapshotDir = path.join(env.home, "snapshots", TAG);
    const durable = path.join(snapshotDir, "memory.bin");
    const staged = fs.readdirSync(path.join(process.env.FORKD_SHM_DIR!, "images")).find((n) => n.startsWith(`${TAG}@`))!;
    expect(tamper(durable)).toBeGreaterThan(0);
    expect(tamper(path.join(process.env.FORKD_SHM_DIR!, "images", staged, "memory.bin"))).toBeGreaterThan(0);
    const res = forkd(["fork", "--tag", TAG, "-n", "1"]);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toMatch(
      new RegExp(
        `the memory image of snapshot ${TAG} in the durable store \\(${durable}\\) has sha256 [0-9a-f]{16}…, but registration recorded`,
      ),
    );
    expect(res.stderr).toContain(`remove the snapshot (forkd rmi ${TAG}) and create it again`);
    expect(forkd(["ls", "--json"]).stdout.trim()).toBe("[]");
  });

  it("refuses a staging dir that is a symlink", () => {
    const real = fs.mkdtempSync(path.join(env.runDir, "shm-real-"));
    const link = path.join(env.runDir, "shm-link");
    fs.symlinkSync(real, link);
    const res = forkd(["fork", "--tag", TAG, "-n", "1"], { FORKD_SHM_DIR: link });
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain(`forkd's staging dir (FORKD_SHM_DIR) ${link} is a symlink`);
    expect(fs.readdirSync(real)).toEqual([]);
  });
});
