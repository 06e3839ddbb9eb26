// scripts/undo-ip-forward.sh (run by setup): an earlier setup of ours turned on
// net.ipv4.ip_forward host-wide and persisted it; forkd now forwards only on its own
// namespace's links, so setup turns it back off, but only where the file we wrote
// says it was us, and not where another sysctl file asks for forwarding too.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";

const SCRIPT = path.resolve(import.meta.dirname, "../../scripts/undo-ip-forward.sh");
const OURS = "# forkd: route the sandboxes' egress namespace out (see the README security model)\nnet.ipv4.ip_forward = 1\n";

/** A fake /etc/sysctl.d, /etc/sysctl.conf and /proc/sys: the script is run against them, never the host's. */
function host(conf: string | undefined, value: string, others: Record<string, string> = {}) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-ipfwd-"));
  const sysctlD = path.join(root, "sysctl.d");
  const procSys = path.join(root, "proc-sys");
  const otherDir = path.join(root, "usr-lib-sysctl.d");
  fs.mkdirSync(sysctlD);
  fs.mkdirSync(otherDir);
  fs.mkdirSync(path.join(procSys, "net", "ipv4"), { recursive: true });
  if (conf !== undefined) fs.writeFileSync(path.join(sysctlD, "61-forkd-net.conf"), conf);
  for (const [name, text] of Object.entries(others)) fs.writeFileSync(path.join(otherDir, name), text);
  fs.writeFileSync(path.join(root, "sysctl.conf"), "#net.ipv4.ip_forward=1\n");
  fs.writeFileSync(path.join(procSys, "net", "ipv4", "ip_forward"), `${value}\n`);
  const env = {
    ...process.env,
    SYSCTL_D: sysctlD,
    SYSCTL_CONF: path.join(root, "sysctl.conf"),
    SYSCTL_OTHER_DIRS: otherDir,
    PROC_SYS: procSys,
  };
  const run = () => spawnSync("bash", [SCRIPT], { env, encoding: "utf8" });
  const state = () => ({
    conf: fs.existsSync(path.join(sysctlD, "61-forkd-net.conf")),
    value: fs.readFileSync(path.join(procSys, "net", "ipv4", "ip_forward"), "utf8").trim(),
  });
  return { run, state, cleanup: () => fs.rmSync(root, { recursive: true, force: true }) };
}

describe("undo-ip-forward.sh", () => {
  it("removes the file an earlier setup wrote and returns ip_forward to 0", () => {
    const h = host(OURS, "1");
    const res = h.run();
    expect(res.status, res.stderr).toBe(0);
    expect(res.stderr).toMatch(/returned net.ipv4.ip_forward to 0/);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    // Idempotent: a second run finds nothing of ours and changes nothing.
    expect(h.run().status).toBe(0);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    h.cleanup();
  });

  it("leaves the operator's own setting alone: no file of ours, a file not as we wrote it, or another file asking for forwarding", () => {
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
    const docker = host(OURS, "1", { "99-router.conf": "net.ipv4.ip_forward = 1\n" });
    const kept = docker.run();
    expect(kept.stderr).toMatch(/stays as it is: .*99-router.conf asks for it too/);
    expect(docker.state()).toEqual({ conf: false, value: "1" });
    docker.cleanup();
  });
});
