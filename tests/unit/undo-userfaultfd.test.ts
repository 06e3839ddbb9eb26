// scripts/undo-userfaultfd.sh (run by setup): an earlier setup of ours turned on
// vm.unprivileged_userfaultfd host-wide and persisted it; live BRANCH no longer needs
// it, so setup turns it back off, but only where the file we wrote says it was us.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";

const SCRIPT = path.resolve(import.meta.dirname, "../../scripts/undo-userfaultfd.sh");
const OURS = "# forkd: live BRANCH of VMMs that run as unprivileged uids\nvm.unprivileged_userfaultfd = 1\n";

/** A fake /etc/sysctl.d and /proc/sys: the script is run against them, never the host's. */
function host(conf: string | undefined, value: string) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-uffd-"));
  const sysctlD = path.join(root, "sysctl.d");
  const procSys = path.join(root, "proc-sys");
  fs.mkdirSync(sysctlD);
  fs.mkdirSync(path.join(procSys, "vm"), { recursive: true });
  if (conf !== undefined) fs.writeFileSync(path.join(sysctlD, "60-forkd.conf"), conf);
  fs.writeFileSync(path.join(procSys, "vm", "unprivileged_userfaultfd"), `${value}\n`);
  const run = () => spawnSync("bash", [SCRIPT], { env: { ...process.env, SYSCTL_D: sysctlD, PROC_SYS: procSys }, encoding: "utf8" });
  const state = () => ({
    conf: fs.existsSync(path.join(sysctlD, "60-forkd.conf")),
    value: fs.readFileSync(path.join(procSys, "vm", "unprivileged_userfaultfd"), "utf8").trim(),
  });
  return { run, state, cleanup: () => fs.rmSync(root, { recursive: true, force: true }) };
}

describe("undo-userfaultfd.sh", () => {
  it("removes the file an earlier setup wrote and returns the sysctl to 0", () => {
    const h = host(OURS, "1");
    const res = h.run();
    expect(res.status, res.stderr).toBe(0);
    expect(res.stderr).toMatch(/returning vm.unprivileged_userfaultfd to 0/);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    // Idempotent: a second run finds nothing of ours and changes nothing.
    expect(h.run().status).toBe(0);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    h.cleanup();
  });

  it("leaves the operator's own setting alone: no file of ours, or a file not as we wrote it", () => {
    const none = host(undefined, "1");
    expect(none.run().status).toBe(0);
    expect(none.state()).toEqual({ conf: false, value: "1" });
    none.cleanup();
    const edited = host(`${OURS}# kept on purpose\n`, "1");
    const res = edited.run();
    expect(res.status).toBe(0);
    expect(res.stderr).toMatch(/not as forkd wrote it/);
    expect(edited.state()).toEqual({ conf: true, value: "1" });
    edited.cleanup();
  });
});
