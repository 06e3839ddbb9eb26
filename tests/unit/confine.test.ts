import { buildQemuArgs, exposedPaths, launcherArgs, planConfinement, VMM_GID, VMM_UID_BASE, type VmPlan } from "@forkd/core";
import { describe, expect, it } from "vitest";

const plan: VmPlan = {
  accel: "tcg",
  memoryMib: 256,
  vcpus: 1,
  runDir: "/run/forkd/vms/sb-0123456789ab",
  rootfs: "/var/lib/forkd/images/base/abc/rootfs.ext4",
  memory: { kind: "file", path: "/dev/shm/forkd/images/t@1/memory.bin", share: false },
  incoming: true,
  network: "user",
};

describe("VMM confinement plan", () => {
  it("exposes only the runtime dir, the image and the memory file's dir", () => {
    expect(exposedPaths(plan)).toEqual(["/run/forkd/vms/sb-0123456789ab", "/var/lib/forkd/images/base/abc", "/dev/shm/forkd/images/t@1"]);
  });

  it("hides forkd's state, the other VMs and the host's secrets", () => {
    process.env.FORKD_HOME = "/var/lib/forkd";
    process.env.FORKD_RUN_DIR = "/run/forkd";
    process.env.FORKD_SHM_DIR = "/dev/shm/forkd";
    // A relative path would hide nothing (or the wrong thing): refused, not skipped.
    process.env.FORKD_CONFINE_HIDE = "/etc/forkd-token:relative/path";
    expect(() => planConfinement(plan, VMM_UID_BASE + 7)).toThrow(/FORKD_CONFINE_HIDE='.*relative\/path' is not allowed/);
    process.env.FORKD_CONFINE_HIDE = "/etc/forkd-token";
    const c = planConfinement(plan, VMM_UID_BASE + 7);
    expect(c.hide).toEqual(
      expect.arrayContaining(["/var/lib/forkd", "/run/forkd", "/dev/shm/forkd", "/root", "/etc/shadow", "/etc/forkd-token"]),
    );
    expect(c.uid).toBe(VMM_UID_BASE + 7);
    expect(c.groups).toEqual([VMM_GID]);
    const args = launcherArgs(c, true);
    expect(args.slice(0, 6)).toEqual(["--uid", String(VMM_UID_BASE + 7), "--gid", String(VMM_GID), "--groups", String(VMM_GID)]);
    expect(args.at(-2)).toBe("--die-with-parent");
    expect(args.at(-1)).toBe("--");
  });

  it("hands a child its staged image as a sealed memfd: nothing of the staging dir exposed, mem-path the inherited fd", () => {
    const sealed: VmPlan = { ...plan, memory: { kind: "sealed", source: "/proc/4242/fd/3" } };
    expect(exposedPaths(sealed)).toEqual(["/run/forkd/vms/sb-0123456789ab", "/var/lib/forkd/images/base/abc"]);
    const args = launcherArgs(planConfinement(sealed, VMM_UID_BASE + 7), false);
    expect(args.slice(args.indexOf("--memfd"), args.indexOf("--memfd") + 2)).toEqual(["--memfd", "/proc/4242/fd/3"]);
    const qemu = buildQemuArgs(sealed).join(" ");
    expect(qemu).toContain("memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/100,share=off");
    expect(qemu).not.toContain("/proc/4242");
  });

  it("refuses a uid outside the reserved range, and root above all", () => {
    expect(() => planConfinement(plan, 0)).toThrow(/reserved range/);
    expect(() => planConfinement(plan, 1000)).toThrow(/reserved range/);
  });

  it("puts KVM's group in only for KVM guests", () => {
    expect(planConfinement(plan, VMM_UID_BASE, { kvmGid: 108 }).groups).toEqual([VMM_GID]);
    expect(planConfinement({ ...plan, accel: "kvm" }, VMM_UID_BASE, { kvmGid: 108 }).groups).toEqual([VMM_GID, 108]);
  });

  it("gives every QEMU the seccomp sandbox and a bounded console, and no exec: anywhere", () => {
    const args = buildQemuArgs(plan).join(" ");
    expect(args).toContain("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    expect(args).toMatch(/-chardev ringbuf,id=console,size=\d+ -serial chardev:console/);
    expect(args).not.toContain("exec:");
  });
});
