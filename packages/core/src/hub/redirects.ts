// Where a registry may send forkd by a redirect. Downloads follow redirects by hand
// (hub/download.ts, hub/registry-client.ts), and each hop is checked here.
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { ForkdError } from "../common/errors.js";
import { isNonPublicAddress } from "../net/policy.js";

/** The addresses a host name stands for (an address stands for itself). */
export type ResolveHost = (host: string) => Promise<string[]>;

const resolveWithDns: ResolveHost = async (host) => {
  const bare = host.replace(/^\[|\]$/g, "");
  if (isIP(bare)) return [bare];
  if (bare.toLowerCase() === "localhost" || bare.toLowerCase().endsWith(".localhost")) return ["127.0.0.1"];
  try {
    return (await lookup(bare, { all: true, verbatim: true })).map((a) => a.address);
  } catch {
    return []; // fetch will say it cannot reach it
  }
};

async function nonPublic(host: string, resolve: ResolveHost): Promise<boolean> {
  return (await resolve(host)).some(isNonPublicAddress);
}

/**
 * A registry (or hub index) on the public internet may not send forkd to this
 * host's loopback, a private network or cloud metadata by a redirect: that would
 * make a pull a way to read what only this machine can reach. A registry that is
 * itself on such an address (a local or in-house registry) may redirect anywhere,
 * as its operator put it there. (Checked per hop, by what the name resolves to now.)
 */
export async function checkRedirect(origin: URL, next: URL, what: string, resolve: ResolveHost = resolveWithDns): Promise<void> {
  if (await nonPublic(origin.hostname, resolve)) return;
  if (!(await nonPublic(next.hostname, resolve))) return;
  throw new ForkdError(
    "bad_request",
    `${what}: ${origin.host} redirected to ${next.host}, a loopback, private or link-local address; refused (a public registry may not send forkd into this host's networks)`,
    { from: origin.host, to: next.host },
  );
}
