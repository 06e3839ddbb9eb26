// Host checks behind `forkd doctor`: each says pass/warn/fail and how to fix it.
import fs from "node:fs";
import { chooseAccel } from "../boot/vm.js";
import { qemuBinary } from "../common/config.js";
import { runProgram } from "../common/program.js";
import { setting } from "../common/settings.js";
import { discoverKernel, getImage } from "../guest/image.js";
import { egressNamespaceInfo, egressPolicyEnabled, egressPolicyMarkedOff, egressProblems } from "../net/netns.js";
import { detectCgroups } from "../sandbox/cgroup.js";
import { capturePagesPath } from "../vmm/capture-pages.js";
import { confinementEnabled, hiddenPaths, launcherPath, VMM_GID, VMM_UID_BASE, VMM_UID_COUNT } from "../vmm/confine.js";

type CheckStatus = "pass" | "warn" | "fail";
export type Check = { name: string; status: CheckStatus; detail: string; fix?: string };

async function which(file: string): Promise<boolean> {
  for (const dir of setting("searchPath").split(":")) {
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
  checks.push(confinementCheck());
  checks.push(liveCaptureCheck());
  checks.push(await egressCheck());
  const cgroups = detectCgroups();
  const controllers = cgroups ? (["memory", "cpu"] as const).filter((c) => Boolean(cgroups[c])) : [];
  const missing = (["memory", "cpu"] as const).filter((c) => !controllers.includes(c));
  checks.push({
    name: "cgroups",
    status: missing.length > 0 ? "warn" : "pass",
    detail: cgroups ? `v${cgroups.version}: ${controllers.join(", ") || "neither memory nor cpu"}` : "none",
    ...(missing.length > 0
      ? {
          fix: `mount the ${missing.join(" and ")} controller${missing.length > 1 ? "s" : ""}: without cpu, sandboxes run with no CPU quota (one spinning guest can starve the rest); without memory, --memory-limit-mib is refused`,
        }
      : {}),
  });
  return checks;
}

async function egressCheck(): Promise<Check> {
  const name = "egress policy";
  if (!egressPolicyEnabled() || egressPolicyMarkedOff()) {
    return {
      name,
      status: "fail",
      detail:
        "off (FORKD_NETWORK_POLICY=off or `forkd daemon --network-policy off`): sandboxes with a network reach the host's loopback services (10.0.2.2), cloud metadata and private networks",
      fix: "unset FORKD_NETWORK_POLICY and start the daemon without --network-policy off",
    };
  }
  const problems = await egressProblems();
  if (problems.length) {
    return { name, status: "fail", detail: problems.map((p) => p.detail).join("; "), fix: problems.map((p) => p.fix).join("; ") };
  }
  const ns = egressNamespaceInfo();
  const where = ns ? `namespace ${ns.netns}` : "a namespace is created on first use";
  if (ns?.loopbackResolvers.length) {
    return {
      name,
      status: "warn",
      detail: `public internet only (${where}); the host's resolver ${ns.loopbackResolvers.join(", ")} is on its loopback, which sandboxes never reach: they have no DNS`,
      fix: "list non-loopback resolvers in /etc/resolv.conf (with systemd-resolved: link it to /run/systemd/resolve/resolv.conf), then `forkd cleanup` with no sandbox running",
    };
  }
  return { name, status: "pass", detail: `public internet only, per-sandbox allow_out/deny_out (${where})` };
}

/**
 * Live BRANCH, workspace suspend and live fork-to-many copy the pages a guest wrote
 * out of its VMM (process_vm_readv) with a helper built beside core: it needs that
 * helper, and the right to read a VMM that runs as another uid (root here).
 */
function liveCaptureCheck(): Check {
  const helper = capturePagesPath();
  if (!fs.existsSync(helper)) {
    return {
      name: "live capture",
      status: "warn",
      detail: `${helper} is not built: live BRANCH and live fork are unavailable (diff and full work)`,
      fix: "npm run build (needs gcc and libc6-dev)",
    };
  }
  if (confinementEnabled() && process.getuid?.() !== 0) {
    return {
      name: "live capture",
      status: "warn",
      detail:
        "VMMs run as other uids and this process is not root, so it cannot read their memory: live BRANCH and live fork are unavailable",
      fix: "run the daemon as root (confinement needs it too)",
    };
  }
  return {
    name: "live capture",
    status: "pass",
    detail: "copies only the pages a guest wrote, while it is stopped (no userfaultfd, no host sysctl)",
  };
}

/** What confines each VMM here, or why nothing does. */
function confinementCheck(): Check {
  if (!confinementEnabled()) {
    return {
      name: "confinement",
      status: "fail",
      detail:
        "FORKD_CONFINE=off: VMMs run with forkd's own uid and capabilities and see the whole host filesystem (QEMU's seccomp filter still applies)",
      fix: "unset FORKD_CONFINE and run forkd as root",
    };
  }
  const launcher = launcherPath();
  if (!fs.existsSync(launcher)) {
    return { name: "confinement", status: "fail", detail: `${launcher} is not built`, fix: "npm run build (needs gcc libc6-dev)" };
  }
  if (process.geteuid?.() !== 0) {
    return {
      name: "confinement",
      status: "fail",
      detail: "forkd is not root, so it cannot give VMMs their own uid and mount view",
      fix: "run as root, or FORKD_CONFINE=off",
    };
  }
  return {
    name: "confinement",
    status: "pass",
    detail: `each VMM: own uid from ${VMM_UID_BASE}..${VMM_UID_BASE + VMM_UID_COUNT - 1}, group ${VMM_GID}, no capabilities, no_new_privs, seccomp (-sandbox on, spawn/elevateprivileges/resourcecontrol/obsolete denied), private mount view hiding ${hiddenPaths().join(", ")}`,
  };
}
