// Host checks behind `forkd doctor`: each says pass/warn/fail and how to fix it.
import fs from "node:fs";
import { chooseAccel } from "../boot/vm.js";
import { qemuBinary } from "../common/config.js";
import { runProgram } from "../common/program.js";
import { discoverKernel, getImage } from "../guest/image.js";

export type CheckStatus = "pass" | "warn" | "fail";
export type Check = { name: string; status: CheckStatus; detail: string; fix?: string };

async function which(file: string): Promise<boolean> {
  for (const dir of (process.env.PATH ?? "/usr/bin:/bin").split(":")) {
    try {
      fs.accessSync(`${dir}/${file}`, fs.constants.X_OK);
      return true;
    } catch {
      // keep looking
    }
  }
  return false;
}

export async function runDoctor(opts: { accel?: string } = {}): Promise<Check[]> {
  const checks: Check[] = [];
  const choice = await chooseAccel({ override: opts.accel }).catch((err: Error) => err);
  const accel = choice instanceof Error ? "tcg" : choice.accel;
  const binary = qemuBinary(accel);
  const version = await runProgram(binary, ["--version"]).catch(() => undefined);
  checks.push(
    version && version.code === 0
      ? { name: "qemu", status: "pass", detail: `${binary}: ${version.stdout.split("\n")[0]}` }
      : { name: "qemu", status: "fail", detail: `${binary} is not installed`, fix: "apt-get install qemu-system-x86 qemu-utils" },
  );
  checks.push(
    choice instanceof Error
      ? { name: "accel", status: "fail", detail: choice.message, fix: "use --accel kvm or --accel tcg" }
      : {
          name: "accel",
          status: choice.accel === "kvm" ? "pass" : "warn",
          detail: `${choice.accel}: ${choice.reason}`,
          ...(choice.accel === "tcg" ? { fix: "nothing to do unless you expected KVM: guests run correctly but slower under TCG" } : {}),
        },
  );
  try {
    const kernel = await discoverKernel();
    checks.push({ name: "guest kernel", status: "pass", detail: `${kernel.vmlinuz} (modules in ${kernel.modulesDir})` });
  } catch (err) {
    checks.push({ name: "guest kernel", status: "fail", detail: (err as Error).message, fix: "apt-get install linux-image-cloud-amd64" });
  }
  const busybox = fs.existsSync("/bin/busybox");
  checks.push(
    busybox
      ? { name: "busybox", status: "pass", detail: "/bin/busybox" }
      : { name: "busybox", status: "fail", detail: "/bin/busybox missing", fix: "apt-get install busybox-static" },
  );
  for (const [tool, pkg] of [
    ["mkfs.ext4", "e2fsprogs"],
    ["cc", "gcc libc6-dev"],
    ["ldd", "libc-bin"],
  ] as const) {
    checks.push(
      (await which(tool))
        ? { name: tool, status: "pass", detail: "found" }
        : { name: tool, status: "fail", detail: `${tool} not on PATH`, fix: `apt-get install ${pkg}` },
    );
  }
  try {
    const image = await getImage("base");
    checks.push({ name: "image cache", status: "pass", detail: `base ${image.digest.slice(0, 12)} (kernel ${image.kernelVersion})` });
  } catch (err) {
    checks.push({ name: "image cache", status: "warn", detail: (err as Error).message, fix: "forkd image build" });
  }
  try {
    const st = fs.statfsSync("/dev/shm");
    const freeGib = (st.bavail * st.bsize) / 2 ** 30;
    checks.push({
      name: "/dev/shm",
      status: freeGib >= 2 ? "pass" : "warn",
      detail: `${freeGib.toFixed(1)} GiB free (snapshot memory images are staged here)`,
      ...(freeGib < 2 ? { fix: "mount -o remount,size=8G /dev/shm" } : {}),
    });
  } catch {
    checks.push({ name: "/dev/shm", status: "fail", detail: "/dev/shm is not mounted", fix: "mount -t tmpfs tmpfs /dev/shm" });
  }
  const uffdDevice = fs.existsSync("/dev/userfaultfd");
  const unprivileged = readTrim("/proc/sys/vm/unprivileged_userfaultfd");
  const root = process.getuid?.() === 0;
  checks.push(
    root || uffdDevice || unprivileged === "1"
      ? {
          name: "userfaultfd",
          status: "pass",
          detail: `${root ? "running as root" : uffdDevice ? "/dev/userfaultfd present" : "unprivileged userfaultfd allowed"} (live BRANCH uses write-protect on shmem)`,
        }
      : {
          name: "userfaultfd",
          status: "warn",
          detail: "not available to this user; live BRANCH will not work",
          fix: "sysctl vm.unprivileged_userfaultfd=1 or run as root",
        },
  );
  const cgroup = fs.existsSync("/sys/fs/cgroup/cgroup.controllers")
    ? "v2 (unified)"
    : fs.existsSync("/sys/fs/cgroup/memory")
      ? "v1 (memory controller)"
      : "none";
  checks.push({
    name: "cgroups",
    status: cgroup === "none" ? "warn" : "pass",
    detail: cgroup,
    ...(cgroup === "none" ? { fix: "mount a memory cgroup to use --memory-limit-mib" } : {}),
  });
  return checks;
}

function readTrim(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch {
    return undefined;
  }
}
