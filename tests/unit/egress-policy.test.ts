// The egress policy's pure half: entry parsing and the nftables text it renders.
import {
  egressLayout,
  ForkdError,
  formatEgressEntry,
  parseEgressEntry,
  parseEgressPolicy,
  parseResolvConf,
  renderHostRuleset,
  renderNamespaceRuleset,
  renderSandboxRemoval,
  renderSandboxRules,
  uplinkSubnet,
} from "@forkd/core";
import { describe, expect, it } from "vitest";

function refusal(entry: unknown, field = "allow_out"): ForkdError {
  try {
    parseEgressEntry(entry, field);
  } catch (err) {
    if (err instanceof ForkdError) return err;
    throw err;
  }
  throw new Error(`accepted ${String(entry)}`);
}

describe("egress entries", () => {
  it("parses IPs, CIDRs and ports of both families into canonical form", () => {
    expect(parseEgressEntry("1.2.3.4")).toEqual({ family: 4, cidr: "1.2.3.4/32" });
    expect(parseEgressEntry("10.1.2.3/8")).toEqual({ family: 4, cidr: "10.0.0.0/8" });
    expect(parseEgressEntry("0.0.0.0/0")).toEqual({ family: 4, cidr: "0.0.0.0/0" });
    expect(parseEgressEntry("203.0.113.10:8080")).toEqual({ family: 4, cidr: "203.0.113.10/32", port: 8080 });
    expect(parseEgressEntry("192.168.0.0/16:5432")).toEqual({ family: 4, cidr: "192.168.0.0/16", port: 5432 });
    expect(parseEgressEntry("2001:DB8:0:0:0:0:0:1")).toEqual({ family: 6, cidr: "2001:db8::1/128" });
    expect(parseEgressEntry("2001:db8:1:2::/32")).toEqual({ family: 6, cidr: "2001:db8::/32" });
    expect(parseEgressEntry("[2001:db8::1]:443")).toEqual({ family: 6, cidr: "2001:db8::1/128", port: 443 });
    expect(parseEgressEntry("[fd00::/8]:53")).toEqual({ family: 6, cidr: "fd00::/8", port: 53 });
    expect(parseEgressEntry("::ffff:10.0.0.1")).toEqual({ family: 6, cidr: "::ffff:a00:1/128" });
    expect(parseEgressEntry("1:0:0:2:0:0:0:3")).toEqual({ family: 6, cidr: "1:0:0:2::3/128" });
  });

  it("formats entries back the way a user writes them", () => {
    for (const text of ["1.2.3.4", "10.0.0.0/8", "1.2.3.4:80", "10.0.0.0/8:443", "2001:db8::1", "[2001:db8::1]:443", "[fd00::/8]:53"]) {
      expect(formatEgressEntry(parseEgressEntry(text))).toBe(text);
    }
  });

  it("refuses host names, bad prefixes and ports, naming the entry and the field", () => {
    const name = refusal("example.com", "deny_out");
    expect(name.code).toBe("bad_request");
    expect(name.message).toBe("deny_out entry 'example.com': host names are not accepted; give an IP address or CIDR");
    expect(name.details).toEqual({ field: "deny_out", entry: "example.com" });
    expect(refusal("example.com:443").message).toMatch(/host names are not accepted/);
    expect(refusal("10.0.0.0/33").message).toMatch(
      /allow_out entry '10\.0\.0\.0\/33': the prefix length must be a whole number from 0 to 32/,
    );
    expect(refusal("2001:db8::/129").message).toMatch(/from 0 to 128/);
    expect(refusal("1.2.3.4:0").message).toMatch(/port must be a whole number from 1 to 65535/);
    expect(refusal("1.2.3.4:65536").message).toMatch(/port/);
    expect(refusal("[2001:db8::1]:").message).toMatch(/malformed/);
    expect(refusal("[2001:db8::1]x").message).toMatch(/not an IP|malformed/);
    for (const bad of ["", "1.2.3", "256.1.1.1", "1.2.3.4/", "1.2.3.4/8x", "fe80::1%eth0", "1.2.3.4; drop", "10.0.0.0/8 }", 7]) {
      expect(refusal(bad).code).toBe("bad_request");
    }
  });

  it("parses a policy and bounds its size", () => {
    expect(parseEgressPolicy({})).toEqual({ allowOut: [], denyOut: [] });
    expect(parseEgressPolicy({ allowOut: ["10.0.0.0/8"], denyOut: ["1.1.1.1:53"] })).toEqual({
      allowOut: [{ family: 4, cidr: "10.0.0.0/8" }],
      denyOut: [{ family: 4, cidr: "1.1.1.1/32", port: 53 }],
    });
    expect(() => parseEgressPolicy({ allowOut: "10.0.0.0/8" })).toThrow(/allow_out must be an array/);
    expect(() => parseEgressPolicy({ denyOut: Array(257).fill("1.1.1.1") })).toThrow(/deny_out is limited to 256 entries/);
  });
});

describe("egress rulesets", () => {
  it("namespace: replaces its table atomically, denies loopback, link-local, private ranges and the host, allows DNS to the resolvers", () => {
    const text = renderNamespaceRuleset({
      nameservers: { v4: ["10.255.255.53"], v6: [] },
      hostAddrs: ["192.0.2.2", "127.0.0.1", "fd00::2", "::1"],
    });
    const lines = text.split("\n");
    expect(lines.slice(0, 3)).toEqual(["table inet forkd_egress {}", "delete table inet forkd_egress", "table inet forkd_egress {"]);
    const deny4 = lines.find((l) => l.includes("set deny4"))!;
    for (const cidr of [
      "10.0.0.0/8",
      "127.0.0.0/8",
      "169.254.0.0/16",
      "172.16.0.0/12",
      "192.168.0.0/16",
      "100.64.0.0/10",
      "0.0.0.0/8",
      "192.0.2.2",
    ]) {
      expect(deny4).toContain(cidr);
    }
    // The host's loopback is in 127/8 already: listed once.
    expect(deny4.match(/127\./g)).toHaveLength(1);
    const deny6 = lines.find((l) => l.includes("set deny6"))!;
    for (const cidr of ["fc00::/7", "fe80::/10", "::/127"]) expect(deny6).toContain(cidr);
    expect(deny6).not.toContain("fd00::2");
    expect(text).toContain("set nameservers4 { type ipv4_addr; elements = { 10.255.255.53 } }");
    expect(text).toContain("set nameservers6 { type ipv6_addr; }");
    // DNS to the resolvers comes before the private-range drop, and the default ends in accept.
    const chain = text.slice(text.indexOf("chain egress_default"), text.indexOf("chain output"));
    expect(chain.indexOf("@nameservers4")).toBeLessThan(chain.indexOf("@deny4"));
    expect(chain).toMatch(/th dport 53 accept/);
    expect(text).toMatch(/type filter hook output priority filter; policy drop;/);
    expect(text).toMatch(/meta skuid vmap @sandboxes\n\s+jump egress_default/);
  });

  it("sandbox: allow_out before deny_out before the default, keyed by uid, replacing the uid's old rules", () => {
    const policy = parseEgressPolicy({ allowOut: ["10.77.0.0/16", "[2001:db8::1]:443"], denyOut: ["0.0.0.0/0", "203.0.113.10:80"] });
    const text = renderSandboxRules(2013265999, policy);
    expect(text.split("\n")).toEqual([
      "add chain inet forkd_egress sb_2013265999",
      "add element inet forkd_egress sandboxes { 2013265999 : jump sb_2013265999 }",
      "delete element inet forkd_egress sandboxes { 2013265999 }",
      "delete chain inet forkd_egress sb_2013265999",
      "add chain inet forkd_egress sb_2013265999",
      "add rule inet forkd_egress sb_2013265999 ip daddr 10.77.0.0/16 accept",
      "add rule inet forkd_egress sb_2013265999 ip6 daddr 2001:db8::1 meta l4proto { tcp, udp } th dport 443 accept",
      "add rule inet forkd_egress sb_2013265999 ip daddr 0.0.0.0/0 drop",
      "add rule inet forkd_egress sb_2013265999 ip daddr 203.0.113.10 meta l4proto { tcp, udp } th dport 80 drop",
      "add rule inet forkd_egress sb_2013265999 jump egress_default",
      "add element inet forkd_egress sandboxes { 2013265999 : jump sb_2013265999 }",
      "",
    ]);
    expect(renderSandboxRules(2013265999, "none").split("\n").slice(4)).toEqual([
      "add chain inet forkd_egress sb_2013265999",
      "add rule inet forkd_egress sb_2013265999 drop",
      "add element inet forkd_egress sandboxes { 2013265999 : jump sb_2013265999 }",
      "",
    ]);
    // The default only clears whatever an earlier holder of the uid left.
    expect(renderSandboxRules(2013265999, { allowOut: [], denyOut: [] })).toBe(renderSandboxRemoval(2013265999));
    expect(() => renderSandboxRules(0, "none")).toThrow(/not a uid/);
    expect(() => renderSandboxRules(1.5, "none")).toThrow(/not a uid/);
  });

  it("host: its own table masquerades the namespace, drops what it sends to the host but DNS, and lets nothing in", () => {
    const layout = egressLayout("0123456789", 0);
    expect(layout).toMatchObject({
      netns: "forkd-0123456789",
      hostVeth: "fkd0123456789h",
      nsVeth: "fkd0123456789n",
      hostTable: "forkd_0123456789",
    });
    expect(layout.hostVeth.length).toBeLessThanOrEqual(15);
    const text = renderHostRuleset(layout, { v4: ["10.255.255.53"] });
    expect(text.startsWith("table inet forkd_0123456789 {}\ndelete table inet forkd_0123456789\n")).toBe(true);
    expect(text).toContain(`ip saddr ${layout.nsAddr} oifname != "fkd0123456789h" masquerade`);
    expect(text).toMatch(
      /iifname "fkd0123456789h" ip daddr \{ 10\.255\.255\.53 \} meta l4proto \{ tcp, udp \} th dport 53 accept\n\s+iifname "fkd0123456789h" drop/,
    );
    expect(text).toMatch(/oifname "fkd0123456789h" ct state established,related accept\n\s+oifname "fkd0123456789h" drop/);
    expect(renderHostRuleset(layout, { v4: [] })).not.toContain("dport 53");
    expect(() => egressLayout("x; flush ruleset", 0)).toThrow(/10 hex digits/);
  });

  it("uplink /30s stay in link-local, away from the metadata /24", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 253 * 64; i += 7) {
      const { hostAddr, nsAddr } = uplinkSubnet(i);
      expect(hostAddr).toMatch(/^169\.254\.\d+\.\d+$/);
      expect(hostAddr.split(".")[2]).not.toBe("169");
      expect(Number(hostAddr.split(".")[3]) % 4).toBe(1);
      expect(Number(nsAddr.split(".")[3])).toBe(Number(hostAddr.split(".")[3]) + 1);
      seen.add(hostAddr);
    }
    expect(seen.size).toBe(Math.ceil((253 * 64) / 7));
  });

  it("reads the resolvers slirp forwards to, setting loopback ones apart", () => {
    expect(
      parseResolvConf(
        "# comment\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver ::1\nsearch x\nnameserver bogus\n",
      ),
    ).toEqual({ v4: ["10.255.255.53"], v6: ["fe80::1"], loopback: ["127.0.0.53", "::1"] });
  });
});
