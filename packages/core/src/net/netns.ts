// The egress namespace of one forkd instance (one per FORKD_RUN_DIR): every VMM
// with a NIC runs inside it, so user-mode networking's 10.0.2.2 is this
// namespace's loopback (down: nothing listens there), not the host's. Its only
// uplink is a veth pair to the host, masqueraded there; an nftables filter in the
// namespace decides by the VMM's uid what each sandbox may reach (net/policy.ts).
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { forkdRunDir } from "../common/config.js";
import { ensureRuntimeDir } from "../common/dirs.js";
import { ForkdError } from "../common/errors.js";
import { withPidLock } from "../common/pid.js";
import { runChecked, runProgram } from "../common/program.js";
import { setting } from "../common/settings.js";
import {
  type EgressLayout,
  type EgressPolicy,
  egressLayout,
  inV4Cidr,
  NS_TABLE,
  parseResolvConf,
  renderHostRemoval,
  renderHostRuleset,
  renderNamespaceRuleset,
  renderSandboxRemoval,
  renderSandboxRules,
  uplinkSubnet,
} from "./policy.js";

const IP = "ip";
const NFT = "nft";

/** On unless turned off: FORKD_NETWORK_POLICY=off (or `forkd daemon --network-policy off`); doctor then fails its check. */
export function egressPolicyEnabled(): boolean {
  return setting("networkPolicy") === "on";
}

/** A daemon started with the policy off leaves this mark, so `forkd doctor` run beside it knows. */
function offMarkPath(): string {
  return path.join(forkdRunDir(), "network-policy-off");
}

export function markEgressPolicy(enabled: boolean): void {
  if (enabled) {
    fs.rmSync(offMarkPath(), { force: true });
    return;
  }
  ensureRuntimeDir();
  fs.writeFileSync(offMarkPath(), "FORKD_NETWORK_POLICY=off\n", { mode: 0o600 });
}

export function egressPolicyMarkedOff(): boolean {
  return fs.existsSync(offMarkPath());
}

function layoutHash(runDir = forkdRunDir()): string {
  return createHash("sha256").update(path.resolve(runDir)).digest("hex").slice(0, 10);
}

function statePath(): string {
  return path.join(forkdRunDir(), "netns.json");
}

type NamespaceState = EgressLayout & { subnetIndex: number; loopbackResolvers: string[] };

function netnsPath(name: string): string {
  return `/run/netns/${name}`;
}

function readState(): NamespaceState | undefined {
  try {
    return JSON.parse(fs.readFileSync(statePath(), "utf8")) as NamespaceState;
  } catch {
    return undefined;
  }
}

/** What stands in the way of applying the policy on this host, each with its fix. */
export async function egressProblems(): Promise<{ detail: string; fix: string }[]> {
  const problems: { detail: string; fix: string }[] = [];
  if (process.geteuid?.() !== 0) {
    problems.push({ detail: "network namespaces and nftables rules need root", fix: "run forkd as root" });
  }
  if (!fs.existsSync("/proc/self/ns/net")) {
    problems.push({ detail: "this kernel has no network namespaces", fix: "use a kernel with CONFIG_NET_NS" });
  }
  const nft = await runProgram(NFT, ["--version"]).catch(() => undefined);
  if (nft?.code !== 0) problems.push({ detail: "the nft program is not installed", fix: "apt-get install nftables" });
  const ip = await runProgram(IP, ["-V"]).catch(() => undefined);
  if (ip?.code !== 0) problems.push({ detail: "the ip program is not installed", fix: "apt-get install iproute2" });
  // No net.ipv4.ip_forward: forwarding is turned on per interface, only where the namespace's traffic passes (enableForwarding).
  return problems;
}

function unsupported(problems: { detail: string; fix: string }[]): ForkdError {
  return new ForkdError(
    "not_supported",
    `the network egress policy cannot be applied on this host: ${problems.map((p) => `${p.detail} (fix: ${p.fix})`).join("; ")}; or run without it, knowingly: \`forkd daemon --network-policy off\` / FORKD_NETWORK_POLICY=off (sandboxes then reach the host's loopback services and private networks, and \`forkd doctor\` reports a failed check)`,
    { problems },
  );
}

/**
 * The namespace path VMMs with a NIC run in, created on first use (idempotent, and
 * safe against other forkd processes of the same runtime dir), or undefined when
 * the policy is off.
 */
export async function ensureEgressNamespace(): Promise<string | undefined> {
  if (!egressPolicyEnabled()) return undefined;
  const existing = readState();
  if (existing && isComplete(existing)) {
    // Someone may have switched forwarding off since (writing net.ipv4.ip_forward=0 resets every interface).
    if (operatorForwards()) {
      fs.rmSync(UPLINK_RECORD, { force: true });
      await reopenForwarding(existing);
    } else if (!forwardingOn(existing.hostVeth)) {
      await reopenForwarding(existing);
    }
    return netnsPath(existing.netns);
  }
  const problems = await egressProblems();
  if (problems.length) throw unsupported(problems);
  return withLock(async () => {
    const again = readState();
    if (again && isComplete(again)) return netnsPath(again.netns);
    await removeLayout(again ?? egressLayout(layoutHash(), 0));
    const state = await createNamespace();
    fs.writeFileSync(statePath(), `${JSON.stringify(state)}\n`, { mode: 0o600 });
    return netnsPath(state.netns);
  });
}

function isComplete(s: NamespaceState): boolean {
  return fs.existsSync(netnsPath(s.netns)) && fs.existsSync(`/sys/class/net/${s.hostVeth}`);
}

async function createNamespace(): Promise<NamespaceState> {
  const hash = layoutHash();
  const taken = await hostV4Addresses();
  let subnetIndex = Number.parseInt(hash.slice(0, 6), 16);
  // Another forkd instance's uplink (or anything else on the host) may hold this /30 already.
  for (let i = 0; i < 256; i++, subnetIndex++) {
    const { hostAddr } = uplinkSubnet(subnetIndex);
    const net = `${hostAddr.replace(/\.\d+$/, `.${Number(hostAddr.split(".")[3]) - 1}`)}/30`;
    if (!taken.some((a) => inV4Cidr(a, net))) break;
  }
  const layout = egressLayout(hash, subnetIndex);
  const resolvers = parseResolvConf(readTrim("/etc/resolv.conf") ?? "");
  const hostAddrs = [...taken, ...(await hostV6Addresses())];
  try {
    await runChecked(IP, ["netns", "add", layout.netns]);
    await runChecked(IP, ["link", "add", layout.hostVeth, "type", "veth", "peer", "name", layout.nsVeth, "netns", layout.netns]);
    // No IPv6 on the uplink: the namespace has no v6 route out, and the host's side offers it no link-local address.
    writeSysctl(`/proc/sys/net/ipv6/conf/${layout.hostVeth}/disable_ipv6`, "1");
    await runChecked(IP, ["addr", "add", `${layout.hostAddr}/30`, "dev", layout.hostVeth]);
    await runChecked(IP, ["link", "set", layout.hostVeth, "up"]);
    await runChecked(IP, ["-n", layout.netns, "addr", "add", `${layout.nsAddr}/30`, "dev", layout.nsVeth]);
    await runChecked(IP, ["-n", layout.netns, "link", "set", layout.nsVeth, "up"]);
    await runChecked(IP, ["-n", layout.netns, "route", "add", "default", "via", layout.hostAddr]);
    // The namespace's filter goes in before its host side opens: there is no moment without it.
    await nftInNamespace(layout.netns, renderNamespaceRuleset({ nameservers: resolvers, hostAddrs }));
    const opened = await enableForwarding(layout.hostVeth);
    await runChecked(NFT, ["-f", "-"], { input: renderHostRuleset(layout, resolvers, opened) });
  } catch (err) {
    await removeLayout(layout);
    throw err;
  }
  return { ...layout, subnetIndex, loopbackResolvers: resolvers.loopback };
}

async function removeLayout(layout: Pick<EgressLayout, "netns" | "hostVeth" | "hostTable">): Promise<void> {
  // Deleting the namespace deletes its end of the veth, and with it the host's end.
  if (fs.existsSync(netnsPath(layout.netns))) await runProgram(IP, ["netns", "delete", layout.netns]).catch(() => {});
  if (fs.existsSync(`/sys/class/net/${layout.hostVeth}`)) await runProgram(IP, ["link", "delete", layout.hostVeth]).catch(() => {});
  await runProgram(NFT, ["-f", "-"], { input: renderHostRemoval(layout) }).catch(() => {});
  restoreUplinkForwarding();
}

/**
 * The uplinks forkd turned IPv4 forwarding on for, host-wide (every forkd instance
 * of this host shares it): so that forwarding goes back off exactly where forkd
 * turned it on, once no forkd namespace needs it, and nowhere else.
 */
const UPLINK_RECORD = "/run/forkd-uplink-forwarding.json";

function openedUplinks(): string[] {
  try {
    const list = JSON.parse(fs.readFileSync(UPLINK_RECORD, "utf8")) as unknown;
    return Array.isArray(list) ? list.filter((n): n is string => typeof n === "string" && /^[\w.-]{1,15}$/.test(n)) : [];
  } catch {
    return [];
  }
}

/**
 * Turn on IPv4 forwarding only for the namespace's traffic, never
 * net.ipv4.ip_forward (which turns it on for every interface, for everyone).
 * Linux decides by the interface a packet came in on: the host end of the veth
 * (the namespace's packets arrive there), and every interface a reply may come
 * back on, addressed to the namespace once the masquerade is undone. Those that
 * were off are recorded and the host filter forwards nothing that arrives on them
 * except into a forkd namespace (renderHostRuleset): for every other packet the
 * host routes exactly as before. Returns the interfaces forkd turned on (by this
 * or another namespace of this host).
 */
async function enableForwarding(hostVeth: string): Promise<string[]> {
  fs.writeFileSync(`/proc/sys/net/ipv4/conf/${hostVeth}/forwarding`, "1");
  const opened = new Set(openedUplinks());
  for (const dev of replyInterfaces()) {
    const file = `/proc/sys/net/ipv4/conf/${dev}/forwarding`;
    if (readTrim(file) !== "0") continue;
    // Recorded before it is turned on: a crash in between leaves it recorded, so undone.
    opened.add(dev);
    fs.writeFileSync(UPLINK_RECORD, `${JSON.stringify([...opened])}\n`, { mode: 0o644 });
    fs.writeFileSync(file, "1");
  }
  return [...opened];
}

/** The host's interfaces a reply to the namespace may arrive on: all but loopback and forkd's own veths. */
function replyInterfaces(): string[] {
  let devices: string[] = [];
  try {
    devices = fs.readdirSync("/proc/sys/net/ipv4/conf");
  } catch {
    return [];
  }
  return devices.filter((d) => !["all", "default", "lo"].includes(d) && !/^fkd[0-9a-f]+[hn]$/.test(d) && /^[\w.-]{1,15}$/.test(d));
}

/** Every interface the namespace's traffic needs forwards (an interface added since, or a reset by ip_forward=0, shows here). */
function forwardingOn(hostVeth: string): boolean {
  return [hostVeth, ...replyInterfaces()].every((dev) => readTrim(`/proc/sys/net/ipv4/conf/${dev}/forwarding`) !== "0");
}

/**
 * The operator (or a service such as Docker) turned net.ipv4.ip_forward on after
 * forkd opened interfaces: forwarding is theirs now, so forkd forgets its record
 * and stops filtering what arrives on those interfaces.
 */
function operatorForwards(): boolean {
  return readTrim("/proc/sys/net/ipv4/ip_forward") === "1" && openedUplinks().length > 0;
}

async function reopenForwarding(state: NamespaceState): Promise<void> {
  await withLock(async () => {
    const opened = await enableForwarding(state.hostVeth);
    const resolvers = parseResolvConf(readTrim("/etc/resolv.conf") ?? "");
    await runChecked(NFT, ["-f", "-"], { input: renderHostRuleset(state, resolvers, opened) });
  });
}

/** Once no forkd namespace is left on the host, the uplinks forkd turned on go back off. */
function restoreUplinkForwarding(): void {
  let devices: string[] = [];
  try {
    devices = fs.readdirSync("/sys/class/net");
  } catch {
    return;
  }
  if (devices.some((d) => /^fkd[0-9a-f]+h$/.test(d))) return;
  for (const dev of openedUplinks()) writeSysctl(`/proc/sys/net/ipv4/conf/${dev}/forwarding`, "0");
  fs.rmSync(UPLINK_RECORD, { force: true });
}

function nftInNamespace(netns: string, ruleset: string) {
  return runChecked(IP, ["netns", "exec", netns, NFT, "-f", "-"], { input: ruleset });
}

/** Install one sandbox's rules (keyed by its VMM uid) before its VMM starts. */
export async function applySandboxEgress(uid: number, rules: EgressPolicy | "none"): Promise<void> {
  const state = readState();
  if (!state || !egressPolicyEnabled()) throw new ForkdError("internal", "the egress namespace is not set up");
  await nftInNamespace(state.netns, renderSandboxRules(uid, rules));
}

/** Remove one sandbox's rules; nothing to do when the policy is off or the namespace is gone. */
export async function removeSandboxEgress(uid: number | undefined): Promise<void> {
  if (uid === undefined) return;
  const state = readState();
  if (!state || !fs.existsSync(netnsPath(state.netns))) return;
  await nftInNamespace(state.netns, renderSandboxRemoval(uid)).catch(() => {});
}

/** uids with rules in the namespace (for cleanup to drop those whose sandbox is gone). */
export async function sandboxEgressUids(): Promise<number[]> {
  const state = readState();
  if (!state || !fs.existsSync(netnsPath(state.netns))) return [];
  const res = await runProgram(IP, ["netns", "exec", state.netns, NFT, "-j", "list", "map", "inet", NS_TABLE, "sandboxes"]);
  if (res.code !== 0) return [];
  const parsed = JSON.parse(res.stdout) as { nftables: { map?: { elem?: [number, unknown][] } }[] };
  return parsed.nftables.flatMap((o) => (o.map?.elem ?? []).map((e) => Number(e[0])));
}

/** Pids of processes inside the namespace (by the namespace's inode): any one means it is in use. */
function namespacePids(netns: string): number[] {
  let ino: number;
  try {
    ino = fs.statSync(netnsPath(netns)).ino;
  } catch {
    return [];
  }
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readlinkSync(`/proc/${entry}/ns/net`) === `net:[${ino}]`) pids.push(Number(entry));
    } catch {
      // exited, or not ours to read
    }
  }
  return pids;
}

export type EgressNamespaceInfo = { netns: string; path: string; hostVeth: string; hostTable: string; loopbackResolvers: string[] };

export function egressNamespaceInfo(): EgressNamespaceInfo | undefined {
  const s = readState();
  return s
    ? { netns: s.netns, path: netnsPath(s.netns), hostVeth: s.hostVeth, hostTable: s.hostTable, loopbackResolvers: s.loopbackResolvers }
    : undefined;
}

/** Remove this instance's namespace, veth and host table, unless a process still runs inside. */
export async function removeEgressNamespace(): Promise<boolean> {
  const state = readState() ?? { ...egressLayout(layoutHash(), 0) };
  if (!readState() && !fs.existsSync(netnsPath(state.netns))) return false;
  if (namespacePids(state.netns).length > 0) return false;
  await removeLayout(state);
  fs.rmSync(statePath(), { force: true });
  return true;
}

/** One process at a time sets the namespace up; another waits for it (30 s at most). */
function withLock<T>(work: () => Promise<T>): Promise<T> {
  ensureRuntimeDir();
  const busy = (owner: number) => new ForkdError("vm_timeout", `waited 30 s for process ${owner} to set up the egress namespace`);
  return withPidLock(path.join(forkdRunDir(), "netns.lock"), { waitMs: 30_000, busy }, work);
}

async function hostV4Addresses(): Promise<string[]> {
  return hostAddresses("-4");
}

async function hostV6Addresses(): Promise<string[]> {
  return hostAddresses("-6");
}

async function hostAddresses(family: "-4" | "-6"): Promise<string[]> {
  const res = await runChecked(IP, ["-j", family, "addr", "show"]);
  const links = JSON.parse(res.stdout || "[]") as { addr_info?: { local?: string }[] }[];
  return links.flatMap((l) => (l.addr_info ?? []).map((a) => a.local).filter((a): a is string => typeof a === "string"));
}

function writeSysctl(file: string, value: string): void {
  try {
    fs.writeFileSync(file, value);
  } catch {
    // No IPv6 on this host: nothing to turn off.
  }
}

function readTrim(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch {
    return undefined;
  }
}
