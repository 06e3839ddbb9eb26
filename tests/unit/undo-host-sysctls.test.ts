// scripts/undo-host-sysctls.sh (run by setup): earlier setups of ours turned on
// vm.unprivileged_userfaultfd and net.ipv4.ip_forward host-wide and persisted them;
// setup now turns them back off, but only where the file we wrote says it was us,
// and not where another sysctl file asks for the same setting.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";

const SCRIPT = path.resolve(import.meta.dirname, "../../scripts/undo-host-sysctls.sh");

const SETTINGS = [
  {
    key: "vm.unprivileged_userfaultfd",
    file: "60-forkd.conf",
    ours: "# forkd: live BRANCH of VMMs that run as unprivileged uids\nvm.unprivileged_userfaultfd = 1\n",
  },
  {
    key: "net.ipv4.ip_forward",
    file: "61-forkd-net.conf",
    ours: "# forkd: route the sandboxes' egress namespace out (see the README security model)\nnet.ipv4.ip_forward = 1\n",
  },
] as const;

type Setting = (typeof SETTINGS)[number];

/** A fake /etc/sysctl.d, /etc/sysctl.conf and /proc/sys: the script is run against them, never the host's. */
function host(setting: Setting, conf: string | undefined, value: string, others: Record<string, string> = {}) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-sysctls-"));
  const sysctlD = path.join(root, "sysctl.d");
  const procSys = path.join(root, "proc-sys");
  const otherDir = path.join(root, "usr-lib-sysctl.d");
  const procFile = path.join(procSys, ...setting.key.split("."));
  fs.mkdirSync(sysctlD);
  fs.mkdirSync(otherDir);
  fs.mkdirSync(path.dirname(procFile), { recursive: true });
  if (conf !== undefined) fs.writeFileSync(path.join(sysctlD, setting.file), conf);
  for (const [name, text] of Object.entries(others)) fs.writeFileSync(path.join(otherDir, name), text);
  fs.writeFileSync(path.join(root, "sysctl.conf"), `#${setting.key}=1\n`);
  fs.writeFileSync(procFile, `${value}\n`);
  const env = {
    ...process.env,
    SYSCTL_D: sysctlD,
    SYSCTL_CONF: path.join(root, "sysctl.conf"),
    SYSCTL_OTHER_DIRS: otherDir,
    PROC_SYS: procSys,
  };
  const run = () => spawnSync("bash", [SCRIPT], { env, encoding: "utf8" });
  const state = () => ({
    conf: fs.existsSync(path.join(sysctlD, setting.file)),
    value: fs.readFileSync(procFile, "utf8").trim(),
  });
  return { run, state, cleanup: () => fs.rmSync(root, { recursive: true, force: true }) };
}

describe.each(SETTINGS)("undo-host-sysctls.sh: $key", (setting) => {
  it("removes the file an earlier setup wrote and returns the sysctl to 0", () => {
    const h = host(setting, setting.ours, "1");
    const res = h.run();
    expect(res.status, res.stderr).toBe(0);
    expect(res.stderr).toContain(`returned ${setting.key} to 0`);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    // Idempotent: a second run finds nothing of ours and changes nothing.
    expect(h.run().status).toBe(0);
    expect(h.state()).toEqual({ conf: false, value: "0" });
    h.cleanup();
  });

  it("leaves the operator's own setting alone: no file of ours, a file not as we wrote it, or another file asking for it", () => {
    const none = host(setting, undefined, "1");
    expect(none.run().status).toBe(0);
    expect(none.state()).toEqual({ conf: false, value: "1" });
    none.cleanup();
    const edited = host(setting, `${setting.ours}# kept on purpose\n`, "1");
    const res = edited.run();
    expect(res.status).toBe(0);
    expect(res.stderr).toMatch(/not as forkd wrote it/);
    expect(edited.state()).toEqual({ conf: true, value: "1" });
    edited.cleanup();
    const router = host(setting, setting.ours, "1", { "99-router.conf": `${setting.key} = 1\n` });
    const kept = router.run();
    expect(kept.stderr).toMatch(/stays as it is: .*99-router.conf asks for it too/);
    expect(router.state()).toEqual({ conf: false, value: "1" });
    router.cleanup();
  });
});
