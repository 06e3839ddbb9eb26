// The egress policy, pure: parsing allow/deny entries and rendering the nftables
// rulesets that enforce it (unit-tested; net/netns.ts applies them). Every value
// that reaches a ruleset was parsed here into a number or a canonical address,
// so no user text is ever spliced into nft input.
import { isIPv4, isIPv6 } from "node:net";
import { ForkdError } from "../common/errors.js";

export type EgressEntry = { family: 4 | 6 /** Canonical network/prefix. */; cidr: string; port?: number };

/** allow_out opens destinations the default denies; deny_out closes ones it allows; allow_out wins over deny_out. */
export type EgressPolicy = { allowOut: EgressEntry[]; denyOut: EgressEntry[] };

/** What a sandbox's NIC may reach: none (no NIC traffic at all), public (the default policy plus its lists), unfiltered (policy off). */
export type EgressMode = "none" | "public" | "unfiltered";

const MAX_EGRESS_ENTRIES = 256;

/**
 * Denied by default: this host's loopback, link-local (cloud metadata), private
 * and shared ranges, and what is never a public unicast destination anyway.
 */
const DEFAULT_DENY_V4 = [
  "0.0.0.0/8",
  "10.0.0.0/8",
  "100.64.0.0/10",
  "127.0.0.0/8",
  "169.254.0.0/16",
  "172.16.0.0/12",
  "192.0.0.0/24",
  "192.168.0.0/16",
  "198.18.0.0/15",
  "224.0.0.0/4",
  "240.0.0.0/4",
];
const DEFAULT_DENY_V6 = [
  "::/127",
  "::ffff:0:0/96",
  "64:ff9b::/96",
  "64:ff9b:1::/48",
  "100::/64",
  "fc00::/7",
  "fe80::/10",
  "fec0::/10",
  "ff00::/8",
];

function bad(field: string, entry: string, why: string): ForkdError {
  return new ForkdError("bad_request", `${field} entry '${entry.slice(0, 100)}': ${why}`, { field, entry: entry.slice(0, 100) });
}

function v4ToInt(ip: string): number {
  return ip.split(".").reduce((acc, part) => acc * 256 + Number(part), 0);
}

function intToV4(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join(".");
}

function v6ToBigInt(ip: string): bigint {
  let text = ip;
  // An embedded IPv4 tail (::ffff:1.2.3.4) becomes two hex groups.
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const n = v4ToInt(v4[1]!);
    text = `${text.slice(0, v4.index)}${(n >>> 16).toString(16)}:${(n & 0xffff).toString(16)}`;
  }
  const [head, tail] = text.includes("::") ? (text.split("::") as [string, string]) : [text, undefined];
  const headGroups = head ? head.split(":") : [];
  const tailGroups = tail ? tail.split(":") : [];
  const groups =
    tail === undefined ? headGroups : [...headGroups, ...Array(8 - headGroups.length - tailGroups.length).fill("0"), ...tailGroups];
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(Number.parseInt(g, 16)), 0n);
}

/** RFC 5952 text: lower case, the longest run of zero groups (two or more) as "::". */
function bigIntToV6(n: bigint): string {
  const groups = Array.from({ length: 8 }, (_, i) => Number((n >> BigInt((7 - i) * 16)) & 0xffffn));
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen && j - i >= 2) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestStart < 0) return hex.join(":");
  return `${hex.slice(0, bestStart).join(":")}::${hex.slice(bestStart + bestLen).join(":")}`;
}

/** An address or network with its host bits cleared, in canonical text. */
function canonicalCidr(address: string, prefix: number): { family: 4 | 6; cidr: string } {
  if (isIPv4(address)) {
    const n = v4ToInt(address);
    const size = 2 ** (32 - prefix);
    return { family: 4, cidr: `${intToV4(Math.floor(n / size) * size)}/${prefix}` };
  }
  const n = v6ToBigInt(address);
  const mask = prefix === 0 ? 0n : ((1n << BigInt(prefix)) - 1n) << BigInt(128 - prefix);
  return { family: 6, cidr: `${bigIntToV6(n & mask)}/${prefix}` };
}

/**
 * One entry: an IP, a CIDR (v4 or v6), or either with a port: 1.2.3.4:443,
 * 10.0.0.0/8:5432, [2001:db8::1]:443, [2001:db8::/32]:443. A port covers TCP and UDP.
 * Host names are refused: what a name resolves to at fork time is not what the guest will reach later.
 */
export function parseEgressEntry(raw: unknown, field = "allow_out"): EgressEntry {
  if (typeof raw !== "string") throw bad(field, String(raw), "must be a string");
  const text = raw.trim();
  if (text.length === 0 || text.length > 64) throw bad(field, text, "must be an IP, a CIDR, or either with :PORT");
  let host = text;
  let portText: string | undefined;
  if (text.startsWith("[")) {
    const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
    if (!bracketed) throw bad(field, text, "malformed [IPv6]:PORT");
    host = bracketed[1]!;
    portText = bracketed[2];
  } else if (text.split(":").length === 2) {
    // Exactly one colon: IPv4 (or v4 CIDR) with a port. IPv6 has at least two.
    [host, portText] = text.split(":") as [string, string];
  }
  let port: number | undefined;
  if (portText !== undefined) {
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
      throw bad(field, text, "the port must be a whole number from 1 to 65535");
    }
    port = Number(portText);
  }
  const slash = host.indexOf("/");
  const address = slash >= 0 ? host.slice(0, slash) : host;
  const prefixText = slash >= 0 ? host.slice(slash + 1) : undefined;
  const family = isIPv4(address) ? 4 : isIPv6(address) && !address.includes("%") ? 6 : undefined;
  if (family === undefined) {
    const looksLikeName = /^[A-Za-z0-9.-]+$/.test(address) && /[A-Za-z]/.test(address);
    throw bad(
      field,
      text,
      looksLikeName ? "host names are not accepted; give an IP address or CIDR" : "not an IP address or CIDR (v4 or v6)",
    );
  }
  const max = family === 4 ? 32 : 128;
  if (prefixText !== undefined && (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > max)) {
    throw bad(field, text, `the prefix length must be a whole number from 0 to ${max}`);
  }
  const { cidr } = canonicalCidr(address, prefixText === undefined ? max : Number(prefixText));
  return { family, cidr, ...(port !== undefined ? { port } : {}) };
}

export function parseEgressPolicy(input: { allowOut?: unknown; denyOut?: unknown }): EgressPolicy {
  const list = (value: unknown, field: string): EgressEntry[] => {
    if (value === undefined || value === null) return [];
    if (!Array.isArray(value)) throw new ForkdError("bad_request", `${field} must be an array of strings`, { field });
    if (value.length > MAX_EGRESS_ENTRIES)
      throw new ForkdError("bad_request", `${field} is limited to ${MAX_EGRESS_ENTRIES} entries, got ${value.length}`, { field });
    return value.map((v) => parseEgressEntry(v, field));
  };
  return { allowOut: list(input.allowOut, "allow_out"), denyOut: list(input.denyOut, "deny_out") };
}

export function formatEgressEntry(e: EgressEntry): string {
  const host =
    e.family === 4 && e.cidr.endsWith("/32")
      ? e.cidr.slice(0, -3)
      : e.family === 6 && e.cidr.endsWith("/128")
        ? e.cidr.slice(0, -4)
        : e.cidr;
  if (e.port === undefined) return host;
  return e.family === 6 ? `[${host}]:${e.port}` : `${host}:${e.port}`;
}

export function isEmptyPolicy(p: EgressPolicy): boolean {
  return p.allowOut.length === 0 && p.denyOut.length === 0;
}

/** The public shape of a sandbox's policy (REST `network_policy`, `forkd ls --json`). */
export type ApiNetworkPolicy = { mode: EgressMode; allow_out: string[]; deny_out: string[] };

export function policyView(mode: EgressMode, p: EgressPolicy): ApiNetworkPolicy {
  return { mode, allow_out: p.allowOut.map(formatEgressEntry), deny_out: p.denyOut.map(formatEgressEntry) };
}

/** Nameservers of a resolv.conf: the ones slirp forwards the guest's DNS to. */
export function parseResolvConf(text: string): { v4: string[]; v6: string[]; loopback: string[] } {
  const out = { v4: [] as string[], v6: [] as string[], loopback: [] as string[] };
  for (const line of text.split("\n")) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (!m) continue;
    const ip = m[1]!.replace(/%.*$/, "");
    if (isIPv4(ip)) (ip.startsWith("127.") ? out.loopback : out.v4).push(ip);
    else if (isIPv6(ip)) (canonicalCidr(ip, 128).cidr === "::1/128" ? out.loopback : out.v6).push(canonicalCidr(ip, 128).cidr.slice(0, -4));
  }
  return out;
}

/** Names of one forkd instance's namespace, veth pair and host table: derived from its runtime dir. */
export type EgressLayout = {
  netns: string;
  hostVeth: string;
  nsVeth: string;
  hostTable: string;
  /** The /30 of the veth link: host side .1, namespace side .2 (relative to the network). */
  hostAddr: string;
  nsAddr: string;
};

/** The table inside the namespace (one per namespace, so its name is fixed). */
export const NS_TABLE = "forkd_egress";

/** The n-th /30 for an uplink: inside 169.254.0.0/16, skipping 169.254.169.0/24 (cloud metadata's /24) and the first and last /24. */
export function uplinkSubnet(index: number): { hostAddr: string; nsAddr: string } {
  const perOctet = 64;
  const thirds = Array.from({ length: 254 }, (_, i) => i + 1).filter((o) => o !== 169);
  const i = ((index % (thirds.length * perOctet)) + thirds.length * perOctet) % (thirds.length * perOctet);
  const third = thirds[Math.floor(i / perOctet)]!;
  const base = (i % perOctet) * 4;
  return { hostAddr: `169.254.${third}.${base + 1}`, nsAddr: `169.254.${third}.${base + 2}` };
}

export function egressLayout(hash: string, subnetIndex: number): EgressLayout {
  if (!/^[0-9a-f]{10}$/.test(hash)) throw new ForkdError("internal", `egress layout hash must be 10 hex digits, got ${hash}`);
  return {
    netns: `forkd-${hash}`,
    hostVeth: `fkd${hash}h`,
    nsVeth: `fkd${hash}n`,
    hostTable: `forkd_${hash}`,
    ...uplinkSubnet(subnetIndex),
  };
}

const set = (items: string[]) => `{ ${items.join(", ")} }`;

/**
 * The namespace's filter, replacing any earlier one atomically. Every packet a
 * VMM sends passes the output hook with its socket's uid: a sandbox with its own
 * rules is dispatched to its chain by uid, everything else meets the default.
 */
export function renderNamespaceRuleset(opts: { nameservers: { v4: string[]; v6: string[] }; hostAddrs: string[] }): string {
  const hostV4 = opts.hostAddrs.filter((a) => isIPv4(a));
  const hostV6 = opts.hostAddrs.filter((a) => isIPv6(a)).map((a) => canonicalCidr(a, 128).cidr.slice(0, -4));
  const deny4 = [...DEFAULT_DENY_V4, ...hostV4.filter((a) => !DEFAULT_DENY_V4.some((c) => inV4Cidr(a, c)))];
  const deny6 = [...DEFAULT_DENY_V6, ...hostV6.filter((a) => !DEFAULT_DENY_V6.some((c) => inV6Cidr(a, c)))];
  const lines = [
    `table inet ${NS_TABLE} {}`,
    `delete table inet ${NS_TABLE}`,
    `table inet ${NS_TABLE} {`,
    `  set nameservers4 { type ipv4_addr;${opts.nameservers.v4.length ? ` elements = ${set(opts.nameservers.v4)}` : ""} }`,
    `  set nameservers6 { type ipv6_addr;${opts.nameservers.v6.length ? ` elements = ${set(opts.nameservers.v6)}` : ""} }`,
    `  set deny4 { type ipv4_addr; flags interval; elements = ${set(deny4)} }`,
    `  set deny6 { type ipv6_addr; flags interval; elements = ${set(deny6)} }`,
    "  map sandboxes { type uid : verdict; }",
    "  chain egress_default {",
    // slirp forwards the guest's 10.0.2.3 to the host's resolvers: exactly those, on port 53.
    "    ip daddr @nameservers4 meta l4proto { tcp, udp } th dport 53 accept",
    "    ip6 daddr @nameservers6 meta l4proto { tcp, udp } th dport 53 accept",
    "    ip daddr @deny4 drop",
    "    ip6 daddr @deny6 drop",
    "    accept",
    "  }",
    "  chain output {",
    "    type filter hook output priority filter; policy drop;",
    "    ct state established,related accept",
    "    meta skuid vmap @sandboxes",
    "    jump egress_default",
    "  }",
    "}",
  ];
  return `${lines.join("\n")}\n`;
}

function match(e: EgressEntry): string {
  const addr = `${e.family === 4 ? "ip" : "ip6"} daddr ${e.cidr.endsWith(e.family === 4 ? "/32" : "/128") ? e.cidr.replace(/\/\d+$/, "") : e.cidr}`;
  return e.port === undefined ? addr : `${addr} meta l4proto { tcp, udp } th dport ${e.port}`;
}

function checkUid(uid: number): void {
  if (!Number.isInteger(uid) || uid < 1 || uid > 4_294_967_294) throw new ForkdError("internal", `not a uid: ${uid}`);
}

/**
 * One sandbox's rules, keyed by its VMM's uid, replacing whatever that uid had
 * (a uid is reused once freed). "none" drops everything the VMM sends; a policy
 * checks allow_out, then deny_out, then falls to the default. An empty policy
 * only clears the uid's old rules.
 */
export function renderSandboxRules(uid: number, rules: EgressPolicy | "none"): string {
  checkUid(uid);
  const chain = `sb_${uid}`;
  const lines = renderSandboxRemoval(uid).trimEnd().split("\n");
  if (rules === "none") {
    lines.push(`add chain inet ${NS_TABLE} ${chain}`, `add rule inet ${NS_TABLE} ${chain} drop`);
    lines.push(`add element inet ${NS_TABLE} sandboxes { ${uid} : jump ${chain} }`);
  } else if (!isEmptyPolicy(rules)) {
    lines.push(`add chain inet ${NS_TABLE} ${chain}`);
    for (const e of rules.allowOut) lines.push(`add rule inet ${NS_TABLE} ${chain} ${match(e)} accept`);
    for (const e of rules.denyOut) lines.push(`add rule inet ${NS_TABLE} ${chain} ${match(e)} drop`);
    lines.push(`add rule inet ${NS_TABLE} ${chain} jump egress_default`);
    lines.push(`add element inet ${NS_TABLE} sandboxes { ${uid} : jump ${chain} }`);
  }
  return `${lines.join("\n")}\n`;
}

/**
 * Remove a uid's rules; succeeds whether or not it had any: the adds make the
 * deletes always valid, and re-adding an element is a no-op only when its verdict
 * is the same, which is why every sandbox (even "none") maps to its own chain.
 */
export function renderSandboxRemoval(uid: number): string {
  checkUid(uid);
  const chain = `sb_${uid}`;
  return `${[
    `add chain inet ${NS_TABLE} ${chain}`,
    `add element inet ${NS_TABLE} sandboxes { ${uid} : jump ${chain} }`,
    `delete element inet ${NS_TABLE} sandboxes { ${uid} }`,
    `delete chain inet ${NS_TABLE} ${chain}`,
  ].join("\n")}\n`;
}

/**
 * The host's side, in a table of its own (nothing else of the host's ruleset is
 * touched): masquerade the namespace out; nothing from the namespace reaches the
 * host itself but DNS to its listed resolvers; nobody outside opens a connection in.
 */
/**
 * The host's side of one egress namespace. `openedUplinks` are the interfaces forkd
 * turned forwarding on for: what arrives on them is forwarded only towards a forkd
 * namespace (the replies it waits for), never elsewhere, as before forkd.
 */
export function renderHostRuleset(layout: EgressLayout, nameservers: { v4: string[] }, openedUplinks: string[] = []): string {
  const t = layout.hostTable;
  const v = `"${layout.hostVeth}"`;
  const lines = [
    `table inet ${t} {}`,
    `delete table inet ${t}`,
    `table inet ${t} {`,
    "  chain postrouting {",
    "    type nat hook postrouting priority srcnat; policy accept;",
    `    ip saddr ${layout.nsAddr} oifname != ${v} masquerade`,
    "  }",
    "  chain input {",
    "    type filter hook input priority filter; policy accept;",
    ...(nameservers.v4.length ? [`    iifname ${v} ip daddr ${set(nameservers.v4)} meta l4proto { tcp, udp } th dport 53 accept`] : []),
    `    iifname ${v} drop`,
    "  }",
    "  chain forward {",
    "    type filter hook forward priority filter; policy accept;",
    ...(openedUplinks.length ? [`    iifname ${set(openedUplinks.map((d) => `"${d}"`))} oifname != "fkd*" drop`] : []),
    `    oifname ${v} ct state established,related accept`,
    `    oifname ${v} drop`,
    `    iifname ${v} ip saddr != ${layout.nsAddr} drop`,
    "  }",
    "}",
  ];
  return `${lines.join("\n")}\n`;
}

export function renderHostRemoval(layout: Pick<EgressLayout, "hostTable">): string {
  return `table inet ${layout.hostTable} {}\ndelete table inet ${layout.hostTable}\n`;
}

export function inV4Cidr(ip: string, cidr: string): boolean {
  const [net, prefix] = cidr.split("/") as [string, string];
  const size = 2 ** (32 - Number(prefix));
  return Math.floor(v4ToInt(ip) / size) === Math.floor(v4ToInt(net) / size);
}

function inV6Cidr(ip: string, cidr: string): boolean {
  const [net, prefix] = cidr.split("/") as [string, string];
  return canonicalCidr(ip, Number(prefix)).cidr === canonicalCidr(net, Number(prefix)).cidr;
}

/**
 * Is `ip` somewhere the default egress policy denies (loopback, link-local and cloud
 * metadata, private, shared, ULA, multicast, reserved)? The same list decides where a
 * registry may send forkd's own downloads (hub/download.ts).
 */
export function isNonPublicAddress(ip: string): boolean {
  const bare = ip.replace(/^\[|\]$/g, "");
  if (isIPv4(bare)) return DEFAULT_DENY_V4.some((c) => inV4Cidr(bare, c));
  if (isIPv6(bare)) {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(bare);
    if (mapped) return true;
    return DEFAULT_DENY_V6.some((c) => inV6Cidr(bare, c));
  }
  return false;
}
