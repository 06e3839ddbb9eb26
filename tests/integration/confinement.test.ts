// Every QEMU forkd starts (snapshot parents, children, BRANCH materialisers, `forkd
// run`) runs confined: its own unprivileged uid, no capabilities, no_new_privs,
// QEMU's seccomp filter, and a mount view without forkd's state, the daemon's
// token, the other VMs' runtime dirs or the host's secrets. Checked from /proc
// while the operations run, and by trying, as a VMM's uid in its own mount view,
// to read what it must not.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Controller } from "@forkd/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
// Live BRANCH needs the staged memory on tmpfs.
process.env.FORKD_SHM_DIR = fs.mkdtempSync("/dev/shm/forkd-test-");
const root = path.dirname(env.home);
const VMM_UID_BASE = 2_013_265_920;

type Seen = {
  pid: number;
  uid: number;
  seccomp: string;
  noNewPrivs: string;
  capEff: string;
  capBnd: string;
  cmdline: string;
  netns: string;
};
const HOST_NETNS = fs.readlinkSync("/proc/self/ns/net");

function statusOf(pid: number): Seen | undefined {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    const field = (name: string) => new RegExp(`^${name}:\\s*(\\S+)`, "m").exec(status)?.[1] ?? "";
    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
    // Between spawn and exec the process is still the root launcher: only a QEMU counts.
    if (!fs.readlinkSync(`/proc/${pid}/exe`).includes("qemu-system")) return undefined;
    return {
      pid,
      uid: Number(field("Uid")),
      seccomp: field("Seccomp"),
      noNewPrivs: field("NoNewPrivs"),
      capEff: field("CapEff"),
      capBnd: field("CapBnd"),
      cmdline,
      netns: fs.readlinkSync(`/proc/${pid}/ns/net`),
    };
  } catch {
    return undefined;
  }
}

/** Watch every QEMU under this test's root while `work` runs. */
async function watchVmms<T>(work: () => Promise<T>): Promise<{ result: T; seen: Map<number, Seen> }> {
  const seen = new Map<number, Seen>();
  let running = true;
  const poll = (async () => {
    while (running) {
      for (const pid of qemuPidsUnder(root)) {
        const s = statusOf(pid);
        if (s) seen.set(pid, s);
      }
      await new Promise((r) => setTimeout(r, 15));
    }
  })();
  try {
    return { result: await work(), seen };
  } finally {
    running = false;
    await poll;
  }
}

function expectConfined(seen: Map<number, Seen>): void {
  expect(seen.size).toBeGreaterThan(0);
  for (const s of seen.values()) {
    expect(s.uid, s.cmdline).toBeGreaterThanOrEqual(VMM_UID_BASE);
    expect(s.seccomp, s.cmdline).toBe("2");
    expect(s.noNewPrivs, s.cmdline).toBe("1");
    expect(s.capEff, s.cmdline).toBe("0000000000000000");
    expect(s.capBnd, s.cmdline).toBe("0000000000000000");
    expect(s.cmdline).not.toContain("exec:");
    // In the egress namespace or an empty one of its own (a materialiser, no NIC): never the host's.
    expect(s.netns, s.cmdline).not.toBe(HOST_NETNS);
  }
}

/** Run `argv` as `uid` inside the mount view of process `pid` (what that VMM would see if it ran it). */
function asVmm(pid: number, uid: number, argv: string[]) {
  return spawnSync(
    "nsenter",
    ["-t", String(pid), "-m", "--", "setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", "--", ...argv],
    {
      encoding: "utf8",
    },
  );
}

let daemon: DaemonHandle;
let api: Controller;

beforeAll(async () => {
  daemon = await startDaemonProcess(root);
  api = new Controller({ socketPath: daemon.socket, token: daemon.token });
});

afterAll(async () => {
  await api?.close();
  if (daemon) await stopDaemon(daemon);
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
  fs.rmSync(process.env.FORKD_SHM_DIR!, { recursive: true, force: true });
});

describe("every VMM runs confined", () => {
  it("snapshot parents and children: own uid, no capabilities, no_new_privs, seccomp", async () => {
    const parent = await watchVmms(() => api.createSnapshot({ tag: "conf" }));
    expectConfined(parent.seen);
    const children = await watchVmms(async () => {
      const res = await api.createSandboxes({ snapshot_tag: "conf", n: 2 });
      await new Promise((r) => setTimeout(r, 100));
      return res;
    });
    expect(children.result).toHaveLength(2);
    expectConfined(children.seen);
    const uids = new Set([...children.seen.values()].map((s) => s.uid));
    expect(uids.size).toBe(2);
    const parentUid = [...parent.seen.values()][0]!.uid;
    expect(uids.has(parentUid)).toBe(false);
  });

  it("BRANCH capture and materialiser, in every mode", async () => {
    const source = (await api.createSandboxes({ snapshot_tag: "conf", n: 1 }))[0]!.id;
    for (const mode of ["full", "diff", "live"] as const) {
      const run = await watchVmms(() => api.branchSandbox(source, { tag: `conf-${mode}`, mode }));
      expect(run.result.status).toBe("ready");
      expectConfined(run.seen);
      // source + the materialiser that loaded the capture
      expect(run.seen.size).toBeGreaterThanOrEqual(2);
    }
    const [child] = await api.createSandboxes({ snapshot_tag: "conf-live", n: 1 });
    expect(child?.state).toBe("running");
  });

  it("`forkd run` VMs too", async () => {
    const run = await watchVmms(
      () =>
        new Promise<number | null>((resolve) => {
          const p = spawn(process.execPath, [CLI, "run", "--", "true"], { env: process.env, stdio: "ignore" });
          p.on("exit", (code) => resolve(code));
        }),
    );
    expect(run.result).toBe(0);
    expectConfined(run.seen);
  });
});

describe("a VMM's view of the host", () => {
  it("has no token, state database, other VMs' dirs, /root or /etc/shadow; outside it the uid reads nothing of forkd's", async () => {
    const [a, b] = (await api.listSandboxes()).filter((s) => s.state === "running");
    expect(a && b).toBeTruthy();
    const uid = Number(/^Uid:\s*(\d+)/m.exec(fs.readFileSync(`/proc/${a!.pid}/status`, "utf8"))![1]);
    const inside = (argv: string[]) => asVmm(a!.pid, uid, argv);

    // A hidden file reads as empty (/dev/null is mounted over it); a hidden dir is an empty tmpfs.
    const token = inside(["cat", daemon.tokenFile]);
    expect(token.stdout).toBe("");
    expect(token.stdout).not.toContain(daemon.token);
    expect(inside(["cat", path.join(env.home, "forkd.db")]).status).not.toBe(0);
    expect(inside(["ls", "-A", env.home]).stdout.trim()).not.toMatch(/forkd\.db|token|snapshots/);
    const otherRunDir = path.join(env.runDir, "vms", b!.id);
    expect(inside(["ls", otherRunDir]).status).not.toBe(0);
    expect(inside(["cat", "/etc/shadow"]).stdout).toBe("");
    expect(inside(["ls", "-A", "/root"]).stdout.trim()).toBe("");
    // What it needs is there: its own runtime dir with its sockets.
    expect(inside(["ls", path.join(env.runDir, "vms", a!.id)]).stdout).toContain("qmp.sock");

    // Outside its mount view the same uid still cannot read the token or the database.
    const outside = spawnSync("setpriv", [`--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", "--", "cat", daemon.tokenFile], {
      encoding: "utf8",
    });
    expect(outside.status).not.toBe(0);
    expect(outside.stdout).not.toContain(daemon.token);
  });

  it("cannot write the staged image its siblings map: not by path, not through its own memfd, not by dropping the seals", async () => {
    const [a, b] = (await api.listSandboxes()).filter((s) => s.state === "running");
    const uid = Number(/^Uid:\s*(\d+)/m.exec(fs.readFileSync(`/proc/${a!.pid}/status`, "utf8"))![1]);
    const gid = VMM_UID_BASE - 1;
    const imagesDir = path.join(process.env.FORKD_SHM_DIR!, "images");
    const stagedFile = path.join(imagesDir, fs.readdirSync(imagesDir).find((d) => d.startsWith("conf@"))!, "memory.bin");
    // The child maps a sealed memfd, not the staged file.
    const maps = fs.readFileSync(`/proc/${a!.pid}/maps`, "utf8");
    expect(maps).toContain("/memfd:forkd-staged-image");
    expect(maps).not.toContain(stagedFile);
    const before = spawnSync("sha256sum", [`/proc/${a!.pid}/fd/100`], { encoding: "utf8" }).stdout.split(" ")[0];
    // Everything an escaped QEMU (its uid, gid and mount view, its own fds) could try.
    const attack = `
import fcntl, json, mmap, os
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ALLOWED"
    except OSError as e:
        out[name] = e.strerror
attempt("open staged file", lambda: os.open(${JSON.stringify(stagedFile)}, os.O_RDWR))
fd = os.open("/proc/${a!.pid}/fd/100", os.O_RDWR)
attempt("write", lambda: os.pwrite(fd, b"pwned", 4096))
attempt("shared writable map", lambda: mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
attempt("truncate", lambda: os.ftruncate(fd, 4096))
attempt("fallocate", lambda: os.posix_fallocate(fd, 0, 1 << 40))
attempt("add seals", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE))
m = mmap.mmap(fd, 8192, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
m[0:5] = b"mine!"
out["private copy"] = m[0:5].decode()
print(json.dumps(out))
`;
    const run = spawnSync(
      "nsenter",
      ["-t", String(a!.pid), "-m", "--", "setpriv", `--reuid=${uid}`, `--regid=${gid}`, `--groups=${gid}`, "--", "python3", "-c", attack],
      { encoding: "utf8" },
    );
    expect(run.status, run.stderr).toBe(0);
    const results = JSON.parse(run.stdout) as Record<string, string>;
    for (const name of ["open staged file", "write", "shared writable map", "truncate", "fallocate", "add seals"]) {
      expect(results[name], name).not.toBe("ALLOWED");
    }
    // What QEMU itself does still works: a private, copy-on-write mapping of its own.
    expect(results["private copy"]).toBe("mine!");
    // Outside its mount view the same uid cannot reach the staged file either.
    const outside = spawnSync("setpriv", [`--reuid=${uid}`, `--regid=${gid}`, `--groups=${gid}`, "--", "cat", stagedFile], {
      encoding: "utf8",
    });
    expect(outside.status).not.toBe(0);
    // The bytes every child maps are unchanged, and the sibling still answers.
    expect(spawnSync("sha256sum", [`/proc/${b!.pid}/fd/100`], { encoding: "utf8" }).stdout.split(" ")[0]).toBe(before);
    expect((await api.exec(b!.id, { cmd: "echo alive" })).stdout.trim()).toBe("alive");
  });

  it("a guest printing forever costs a bounded console, never the disk", async () => {
    const [a] = (await api.listSandboxes()).filter((s) => s.state === "running");
    const before = spawnSync("du", ["-sk", env.runDir], { encoding: "utf8" }).stdout;
    await api.exec(a!.id, {
      cmd: "i=0; while [ $i -lt 4000 ]; do echo 0123456789012345678901234567890123456789012345678901234567890123456789 > /dev/console; i=$((i+1)); done",
    });
    const after = spawnSync("du", ["-sk", env.runDir], { encoding: "utf8" }).stdout;
    expect(Number.parseInt(after, 10) - Number.parseInt(before, 10)).toBeLessThan(64);
    expect(fs.existsSync(path.join(env.runDir, "vms", a!.id, "console.log"))).toBe(false);
  });
});
