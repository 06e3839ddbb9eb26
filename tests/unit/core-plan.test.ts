import {
  accelFromHost,
  buildQemuArgs,
  compareKernelVersions,
  ForkdError,
  parseAccel,
  planRestore,
  resolveModules,
  validateName,
  validateSandboxId,
} from "@forkd/core";
import { writeCpio } from "@forkd/core/guest/cpio";
import { GUEST_MODULES, initramfsInit } from "@forkd/core/guest/guest-init";
import { describe, expect, it } from "vitest";

const plan = {
  accel: "tcg" as const,
  memoryMib: 256,
  vcpus: 1,
  runDir: "/run/forkd/vms/sb-000000000001",
  rootfs: "/img/rootfs.ext4",
  memory: { kind: "anon" as const },
  network: "user" as const,
};

describe("QEMU command line", () => {
  it("boots a TCG microvm with the agent port, a read-only root and user networking", () => {
    const args = buildQemuArgs({ ...plan, boot: { kernel: "/k", initrd: "/i", append: "console=ttyS0" } });
    const joined = args.join(" ");
    expect(joined).toContain("-M microvm,x-option-roms=off,isa-serial=on,rtc=on");
    expect(joined).toContain("-accel tcg,tb-size=64 -cpu max");
    expect(joined).toContain("virtserialport,chardev=agent,name=forkd.agent");
    expect(joined).toContain("file=/img/rootfs.ext4,format=raw,if=none,id=root,readonly=on");
    expect(joined).toContain("-netdev user,id=net0");
    expect(joined).toContain("-kernel /k -initrd /i -append console=ttyS0");
    expect(args).not.toContain("-incoming");
    expect(joined).not.toContain("memory-backend-file");
  });

  it("restores a child: private file-backed RAM, no kernel, device state from an inherited fd, no net when asked", () => {
    const args = buildQemuArgs({ ...plan, memory: { kind: "file", path: "/dev/shm/m", share: false }, incoming: true, network: "none" });
    const joined = args.join(" ");
    expect(joined).toContain("memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/m,share=off");
    expect(joined).toContain("-numa node,memdev=mem");
    expect(joined).toContain("-incoming defer");
    expect(args).not.toContain("-kernel");
    expect(joined).not.toContain("netdev");
  });

  it("keeps the NIC but cuts it off for an isolated child, so the device set still matches the snapshot", () => {
    expect(buildQemuArgs({ ...plan, network: "isolated" }).join(" ")).toContain(
      "-netdev user,id=net0,restrict=on -device virtio-net-device,netdev=net0",
    );
  });

  it("plans new VMs without the PIT and PIC, and restores each snapshot with the device set it was made with", () => {
    expect(buildQemuArgs(plan).join(" ")).toContain("-M microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,pic=off ");
    expect(buildQemuArgs({ ...plan, machine: "v1" }).join(" ")).toContain("-M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel");
    const snapshot = { accel: "tcg" as const, memoryMib: 256, vcpus: 1, image: { rootfs: "/r" }, network: true };
    const opts = { runDir: "/x", memory: { kind: "anon" as const }, network: true };
    // A manifest written before profiles existed was made on v1.
    expect(planRestore(snapshot as Parameters<typeof planRestore>[0], opts).machine).toBe("v1");
    expect(planRestore({ ...snapshot, machine: "v2" } as Parameters<typeof planRestore>[0], opts).machine).toBe("v2");
    expect(() => buildQemuArgs({ ...plan, machine: "v9" as "v2" })).toThrow(/machine profile 'v9'/);
  });

  it("uses KVM flags under KVM and rejects bad resources", () => {
    expect(buildQemuArgs({ ...plan, accel: "kvm" }).join(" ")).toContain("-accel kvm -cpu host");
    expect(() => buildQemuArgs({ ...plan, memoryMib: 64 })).toThrow(/memory must be/);
    expect(() => buildQemuArgs({ ...plan, vcpus: 0 })).toThrow(/vcpus must be/);
    expect(() => buildQemuArgs({ ...plan, memoryMib: 256.5 })).toThrow(ForkdError);
  });
});

describe("acceleration choice", () => {
  it("falls back to TCG without vmx/svm and says why", () => {
    const choice = accelFromHost("flags\t\t: fpu vme de pse sse2\n", true);
    expect(choice.accel).toBe("tcg");
    expect(choice.reason).toMatch(/neither vmx nor svm/);
  });
  it("wants KVM with vmx and a usable /dev/kvm, TCG without /dev/kvm", () => {
    expect(accelFromHost("flags\t: fpu vmx sse2\n", true).accel).toBe("kvm");
    expect(accelFromHost("flags\t: fpu svm sse2\n", false).accel).toBe("tcg");
  });
  it("parses overrides strictly", () => {
    expect(parseAccel("kvm")).toBe("kvm");
    expect(() => parseAccel("hvf")).toThrow(/kvm' or 'tcg/);
  });
});

describe("image inputs", () => {
  it("sorts Debian kernel versions numerically", () => {
    const sorted = ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-10-cloud-amd64"].sort(compareKernelVersions);
    expect(sorted.at(-1)).toBe("6.1.0-56-cloud-amd64");
  });
  it("finds modules in modules.dep by name, treating - and _ alike, skipping built-ins", () => {
    const dep = [
      "kernel/drivers/virtio/virtio.ko:",
      "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko",
      "kernel/fs/overlayfs/overlay.ko:",
    ].join("\n");
    const found = resolveModules(dep, ["virtio", "virtio-rng", "overlay", "virtio_blk"]);
    expect([...found.keys()]).toEqual(["virtio", "virtio-rng", "overlay"]);
    expect(found.get("virtio-rng")).toBe("kernel/drivers/char/hw_random/virtio-rng.ko");
  });
  it("loads virtio_ring before virtio before virtio_mmio", () => {
    const order = GUEST_MODULES.indexOf.bind(GUEST_MODULES);
    expect(order("virtio_ring")).toBeLessThan(order("virtio"));
    expect(order("virtio")).toBeLessThan(order("virtio_mmio"));
    expect(order("virtio_mmio")).toBeLessThan(order("virtio_blk"));
    expect(initramfsInit(["virtio"])).toContain("switch_root /newroot /opt/forkd/init");
  });
  it("writes newc cpio archives the kernel can unpack", () => {
    const archive = writeCpio([
      { path: "bin", type: "dir", mode: 0o755 },
      { path: "bin/hello", type: "file", mode: 0o755, data: Buffer.from("hi") },
      { path: "bin/sh", type: "symlink", target: "hello" },
    ]);
    expect(archive.subarray(0, 6).toString()).toBe("070701");
    expect(archive.length % 4).toBe(0);
    expect(archive.includes(Buffer.from("TRAILER!!!\0"))).toBe(true);
    expect(() => writeCpio([{ path: "../etc", type: "dir", mode: 0o755 }])).toThrow(/bad cpio path/);
  });
});

describe("names and ids", () => {
  it("accepts good tags and names what a bad one broke", () => {
    expect(validateName("warm-node_1.2", "tag")).toBe("warm-node_1.2");
    expect(() => validateName("../x", "tag")).toThrow(/must start with/);
    expect(() => validateName("a/b", "tag")).toThrow(/only letters/);
    expect(() => validateName("a..b", "tag")).toThrow(/'\.\.'/);
    expect(() => validateName("x".repeat(65), "tag")).toThrow(/limit is 64/);
    expect(() => validateName("", "tag")).toThrow(/non-empty/);
    expect(() => validateName(".hidden", "tag")).toThrow(/must start with/);
  });
  it("recognises sandbox ids", () => {
    expect(validateSandboxId("sb-0123456789ab")).toBe("sb-0123456789ab");
    expect(() => validateSandboxId("sb-../../etc")).toThrow(/not a sandbox id/);
  });
});
