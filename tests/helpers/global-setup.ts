// One temp root for the VM tests of a run (integration, hostile); removed (with any VMM still under it)
// when the run ends, so repeated runs do not fill the disk with snapshots.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { qemuPidsUnder } from "./env.js";

/**
 * Every QEMU any test starts must run confined (its own uid, seccomp, no_new_privs,
 * no capabilities): watched for the whole run, so a code path that forgets the
 * launcher fails the suite whichever test took it.
 */
function watchConfinement(root: string): { stop: () => string[] } {
  const unconfined = new Map<number, string>();
  const firstSeen = new Map<number, number>();
  const timer = setInterval(() => {
    for (const pid of qemuPidsUnder(root)) {
      if (unconfined.has(pid)) continue;
      try {
        if (!fs.readlinkSync(`/proc/${pid}/exe`).includes("qemu-system")) continue; // still the launcher
        const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
        const field = (name: string) => new RegExp(`^${name}:\\s*(\\S+)`, "m").exec(status)?.[1];
        // The launcher sets uid, no_new_privs and capabilities before exec: judged at once.
        const why = [
          field("Uid") === "0" ? "runs as root" : "",
          field("NoNewPrivs") !== "1" ? "no no_new_privs" : "",
          field("CapEff") !== "0000000000000000" ? "has capabilities" : "",
        ];
        // QEMU installs its seccomp filter itself, early in its start (tens of ms of CPU). Judged once it has
        // run that long: by its CPU time, since on a loaded 2-core host a second of wall clock can pass
        // before it is scheduled at all (a wall-clock grace flagged starved QEMUs as unconfined).
        const seen = firstSeen.get(pid) ?? Date.now();
        firstSeen.set(pid, seen);
        if (cpuMsOf(pid) >= 500 || Date.now() - seen >= 30_000) why.push(field("Seccomp") !== "2" ? "no seccomp filter" : "");
        if (why.some(Boolean))
          unconfined.set(
            pid,
            `${why.filter(Boolean).join(", ")}: ${fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ").slice(0, 300)}`,
          );
      } catch {
        // exited meanwhile
      }
    }
  }, 200);
  timer.unref();
  return {
    stop: () => {
      clearInterval(timer);
      return [...unconfined.values()];
    },
  };
}

/** CPU time (user + system) a process has used, from /proc/PID/stat (fields 14 and 15, in clock ticks of 10 ms). */
function cpuMsOf(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  // The command name (field 2) may hold spaces and parentheses: count fields after its closing ')'.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/**
 * The integration and hostile projects both list this file and vitest runs each
 * project's copy (before any file, teardowns after the last): the first creates the
 * root and the watcher, the others join it, and the last teardown removes it.
 */
type SharedRun = { root: string; users: number; watcher: { stop: () => string[] } };
const SHARED = Symbol.for("forkd.tests.vmRoot");
const shared = globalThis as typeof globalThis & { [SHARED]?: SharedRun };

export default function setup(): () => void {
  const run =
    shared[SHARED] ??
    (() => {
      const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-tests-"));
      process.env.FORKD_TEST_ROOT = root;
      return { root, users: 0, watcher: watchConfinement(root) };
    })();
  run.users += 1;
  shared[SHARED] = run;
  return () => {
    run.users -= 1;
    if (run.users > 0) return;
    delete shared[SHARED];
    const { root, watcher } = run;
    const unconfined = watcher.stop();
    for (const pid of qemuPidsUnder(root)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    removeEgressNamespaces(root);
    fs.rmSync(root, { recursive: true, force: true });
    if (unconfined.length > 0) {
      // A teardown that throws does not fail vitest's exit status: set it.
      process.exitCode = 1;
      throw new Error(`QEMU processes ran unconfined during the tests:\n${unconfined.join("\n")}`);
    }
  };
}

/** Each test file's runtime dir may have left an egress namespace (veth, host nft table) behind: remove them. */
function removeEgressNamespaces(root: string): void {
  for (const test of fs.readdirSync(root)) {
    const state = path.join(root, test, "run", "netns.json");
    if (!fs.existsSync(state)) continue;
    const ns = JSON.parse(fs.readFileSync(state, "utf8")) as { netns: string; hostVeth: string; hostTable: string };
    spawnSync("ip", ["netns", "delete", ns.netns], { stdio: "ignore" });
    spawnSync("ip", ["link", "delete", ns.hostVeth], { stdio: "ignore" });
    spawnSync("nft", ["delete", "table", "inet", ns.hostTable], { stdio: "ignore" });
  }
}
