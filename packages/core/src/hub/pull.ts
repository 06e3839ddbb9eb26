// `forkd pull X`: X is a registry reference, a hub name or a pack URL (reference.ts
// tells which, or refuses naming all three), and each has its own way here.
import { ForkdError } from "../common/errors.js";
import { validateName } from "../common/validate.js";
import { hubIndexUrl, pullFromHub, pullFromUrl } from "./hub-index.js";
import type { Progress } from "./pack.js";
import { type PullSource, parsePullSource, type RefOpts } from "./reference.js";
import { type PullResult, pullFromRegistry } from "./registry.js";

export type PullOpts = RefOpts & {
  /** Register the head snapshot under this tag. */
  tag?: string;
  /** The hub index URL for OWNER/NAME (else FORKD_HUB_URL). */
  hub?: string;
  onProgress?: Progress;
};

/** What a pull would fetch, checked before any traffic (the daemon answers 400 with it). */
export function pullSource(source: string, opts: PullOpts = {}): PullSource {
  if (opts.tag !== undefined) validateName(opts.tag, "tag");
  const parsed = parsePullSource(source, opts);
  if (opts.hub !== undefined && parsed.kind !== "hub") {
    throw new ForkdError(
      "bad_request",
      `--hub is for OWNER/NAME pulls; '${source.slice(0, 200)}' is a ${parsed.kind === "url" ? "URL" : "registry reference"}`,
    );
  }
  if (parsed.kind === "hub") hubIndexUrl(opts.hub, opts);
  return parsed;
}

export async function pullSnapshot(source: string, opts: PullOpts = {}): Promise<PullResult & { hub?: string }> {
  const parsed = pullSource(source, opts);
  switch (parsed.kind) {
    case "registry":
      return pullFromRegistry(parsed, opts);
    case "hub":
      return pullFromHub(parsed.name, opts);
    case "url":
      return pullFromUrl(parsed.url, opts);
  }
}
