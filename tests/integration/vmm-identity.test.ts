// A QEMU taken over by its guest controls its own memory (so its command line),
// its environment as it was handed over, and every file in its runtime dir. None
// of that may decide what forkd does: VMMs and the migration copier start with an
// empty environment (the daemon's secrets never reach them), a VMM is known by the
// uid the root launcher gave it and its start time (a rewritten cmdline neither
// hides it from `kill` nor gets it reaped while it runs), and uid claims live where
// no VMM can write. Real VMs; the escape is played from outside, as root, by
// writing what the VMM could write itself.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, isolateForkd, qemuPidsUnder } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
const root = path.dirname(env.home);
const VMM_UID_BASE = 2_013_265_920;
const SECRETS = {
  FORKD_TOKEN: "forkd-token-must-not-leak-4711",
  FORKD_REGISTRY_PASSWORD: "registry-password-must-not-leak-4711",
  AWS_SECRET_ACCESS_KEY: "aws-secret-must-not-leak-4711",
};

function forkd(args: string[], extraEnv: Record<string, string> = {}) {
  const res = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 300_000, env: { ...process.env, ...extraEnv } });
  return { code: res.status, stdout: res.stdout, stderr: res.stderr };
}

function uidOf(pid: number): number | undefined {
  try {
    return Number(/^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]);
  } catch {
    return undefined;
  }
}

/** Copiers are `/bin/cat` with stdout on a file under this test's root. */
function copierPids(): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readlinkSync(`/proc/${entry}/exe`) !== "/usr/bin/cat") continue;
      if (fs.readlinkSync(`/proc/${entry}/fd/1`).startsWith(root)) found.push(Number(entry));
    } catch {
      // exited meanwhile, or not ours to read
    }
  }
  return found;
}

type Seen = { pid: number; uid: number | undefined; environ: string };

function sample(pids: number[], into: Map<number, Seen>, exe: string): void {
  for (const pid of pids) {
    if (into.has(pid)) continue;
    try {
      // Until its exec the process is the root launcher: only the program itself counts.
      if (!fs.readlinkSync(`/proc/${pid}/exe`).includes(exe)) continue;
      into.set(pid, { pid, uid: uidOf(pid), environ: fs.readFileSync(`/proc/${pid}/environ`, "utf8") });
    } catch {
      // exited meanwhile
    }
  }
}

beforeAll(() => {
  const res = forkd(["snapshot", "--tag", "ident"]);
  expect(res.code, res.stderr).toBe(0);
});

afterAll(() => {
  forkd(["kill", "--all"]);
});

describe("what a VMM and the copier are handed", () => {
  it("no environment at all: the daemon's token and credentials reach neither", async () => {
    const qemus = new Map<number, Seen>();
    const copiers = new Map<number, Seen>();
    // Sample while a snapshot (parent VMM + migration copier) runs with the secrets in its environment.
    // The copier lives only while the memory streams (well under a second on a quiet host), so a
    // snapshot may finish between two samples: up to three snapshots, until one was seen.
    for (let attempt = 0; attempt < 3 && copiers.size === 0; attempt++) {
      const run = spawn(process.execPath, [CLI, "snapshot", "--tag", `ident-secrets-${attempt}`], {
        env: { ...process.env, ...SECRETS },
        stdio: "ignore",
      });
      let finished = false;
      const done = new Promise<number | null>((resolve) =>
        run.on("exit", (code) => {
          finished = true;
          resolve(code);
        }),
      );
      while (!finished) {
        sample(qemuPidsUnder(root), qemus, "qemu-system");
        sample(copierPids(), copiers, "/usr/bin/cat");
        await new Promise((r) => setImmediate(r));
      }
      expect(await done).toBe(0);
    }
    expect(qemus.size).toBeGreaterThan(0);
    expect(copiers.size).toBeGreaterThan(0);
    for (const seen of [...qemus.values(), ...copiers.values()]) {
      for (const value of Object.values(SECRETS)) expect(seen.environ).not.toContain(value);
      expect(seen.environ).toBe("");
    }
    // The copier has a uid of its own from forkd's range: not nobody, not a VMM's.
    const vmmUids = new Set([...qemus.values()].map((s) => s.uid));
    for (const copier of copiers.values()) {
      expect(copier.uid).toBeGreaterThanOrEqual(VMM_UID_BASE);
      expect(vmmUids.has(copier.uid)).toBe(false);
    }
  });
});

/** Overwrite a process's argv in its own memory, as a QEMU taken over by its guest can. */
function rewriteCmdline(pid: number): void {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // arg_start and arg_end are fields 48 and 49; the split starts at field 3.
  const start = Number(fields[45]);
  const end = Number(fields[46]);
  expect(end).toBeGreaterThan(start);
  const fd = fs.openSync(`/proc/${pid}/mem`, "r+");
  try {
    const bytes = Buffer.alloc(end - start, "x");
    bytes[bytes.length - 1] = 0;
    fs.writeSync(fd, bytes, 0, bytes.length, start);
  } finally {
    fs.closeSync(fd);
  }
}

/** The process is gone, or a zombie (state Z in /proc/PID/stat): it runs no more. */
function hasExited(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat[stat.lastIndexOf(")") + 2] === "Z";
  } catch {
    return true;
  }
}

describe("a VMM is known by what it cannot change", () => {
  it("a rewritten command line neither hides it from kill nor gets it reaped while it runs", () => {
    const fork = forkd(["fork", "--tag", "ident", "-n", "1", "--json"]);
    expect(fork.code, fork.stderr).toBe(0);
    const [child] = JSON.parse(fork.stdout) as { id: string }[];
    const row = (JSON.parse(forkd(["ls", "--json"]).stdout) as { id: string; pid: number }[]).find((s) => s.id === child!.id)!;
    rewriteCmdline(row.pid);
    const cmdline = fs.readFileSync(`/proc/${row.pid}/cmdline`, "utf8");
    expect(cmdline).not.toContain("qemu-system");
    expect(cmdline).not.toContain(env.runDir);
    // Still listed as running, not reaped as dead while its QEMU runs on.
    const listed = (JSON.parse(forkd(["ls", "--json"]).stdout) as { id: string; state: string }[]).find((s) => s.id === child!.id);
    expect(listed?.state).toBe("running");
    const kill = forkd(["kill", child!.id]);
    expect(kill.code, kill.stderr).toBe(0);
    // Gone, or a zombie its (non-reaping) parent has not collected yet: no longer running either way.
    expect(hasExited(row.pid)).toBe(true);
  });

  it("uid claims live where no VMM can write: a claim file planted in a runtime dir frees nobody's uid", () => {
    const fork = forkd(["fork", "--tag", "ident", "-n", "2", "--json"]);
    expect(fork.code, fork.stderr).toBe(0);
    const [a, b] = JSON.parse(fork.stdout) as { id: string }[];
    const rows = JSON.parse(forkd(["ls", "--json"]).stdout) as { id: string; pid: number }[];
    const uidB = uidOf(rows.find((s) => s.id === b!.id)!.pid)!;
    expect(uidB).toBeGreaterThanOrEqual(VMM_UID_BASE);
    const claimB = path.join(env.runDir, "uids", String(uidB));
    expect(fs.readFileSync(claimB, "utf8")).toBe(path.join(env.runDir, "vms", b!.id));
    // What A's VMM can do in the dir it owns: claim B's uid as its own.
    const runDirA = path.join(env.runDir, "vms", a!.id);
    expect(fs.statSync(runDirA).uid).not.toBe(0);
    fs.writeFileSync(path.join(runDirA, "vmm.uid"), `${uidB}\n`);
    expect(forkd(["kill", a!.id]).code).toBe(0);
    expect(fs.existsSync(claimB)).toBe(true);
    // The claims themselves are root's alone, and outside every VMM's view (FORKD_RUN_DIR is hidden from VMMs).
    for (const dir of ["uids", "vm-uids"]) {
      const st = fs.statSync(path.join(env.runDir, dir));
      expect(st.uid).toBe(0);
      expect(st.mode & 0o077).toBe(0);
    }
  });
});
