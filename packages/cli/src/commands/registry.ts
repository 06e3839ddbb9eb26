// push / pull: snapshot chains through OCI registries, a hub index, or pack URLs, on this host.
import { type PullResult, pullSnapshot, pushSnapshot } from "@forkd/core";
import type { Command } from "commander";
import { byteBar } from "../progress.js";
import { collect, fmtBytes } from "../ui.js";

export function registerRegistry(program: Command): void {
  program
    .command("push")
    .description("push a snapshot and everything it needs to an OCI registry; blobs the registry already has are not sent again")
    .argument("<tag>")
    .argument(
      "<ref>",
      "HOST[:PORT]/REPO[:TAG], e.g. localhost:5000/team/app:v1 (credentials: ~/.docker/config.json or FORKD_REGISTRY_USERNAME/PASSWORD)",
    )
    .option("--insecure-registry <host>", "allow plain http to this HOST[:PORT] (loopback always may; repeatable)", collect, [])
    .option("--json", "print the result as JSON")
    .action(async (tag: string, ref: string, opts: { insecureRegistry: string[]; json?: boolean }) => {
      const bar = byteBar(`push ${tag}`);
      let result: Awaited<ReturnType<typeof pushSnapshot>>;
      try {
        result = await pushSnapshot(tag, ref, { insecureRegistries: opts.insecureRegistry, onProgress: (d, t, s) => bar.update(d, t, s) });
      } finally {
        bar.stop();
      }
      if (opts.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      else {
        process.stdout.write(
          `${result.ref}@${result.digest}: ${result.snapshots.join(" → ")}; uploaded ${result.blobs_uploaded} of ${result.blobs} blobs (${fmtBytes(result.uploaded_bytes)}), ${result.blobs_present} already there\n`,
        );
      }
    });

  program
    .command("pull")
    .description(
      "fetch a snapshot chain, verify every file, and register it. SOURCE is one of: HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] (an OCI registry), OWNER/NAME (looked up in the hub index: --hub or FORKD_HUB_URL), or https://…/NAME.forkd.tar.zst (a pack)",
    )
    .argument("<source>")
    .option("--tag <tag>", "register the head snapshot under this tag")
    .option("--hub <url>", "the hub index (a registry.json) to look OWNER/NAME up in (default: FORKD_HUB_URL)")
    .option("--insecure-registry <host>", "allow plain http to this HOST[:PORT] (loopback always may; repeatable)", collect, [])
    .option("--json", "print the result as JSON")
    .action(async (source: string, opts: { tag?: string; hub?: string; insecureRegistry: string[]; json?: boolean }) => {
      const bar = byteBar(`pull ${source.length > 40 ? `…${source.slice(-39)}` : source}`);
      let result: PullResult;
      try {
        result = await pullSnapshot(source, {
          ...(opts.tag ? { tag: opts.tag } : {}),
          ...(opts.hub ? { hub: opts.hub } : {}),
          insecureRegistries: opts.insecureRegistry,
          onProgress: (d, t, s) => bar.update(d, t, s),
        });
      } finally {
        bar.stop();
      }
      if (opts.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      else {
        const local = result.members_local?.length ? `, ${result.members_local.length} files already here` : "";
        process.stdout.write(
          `${result.tag} ready: registered ${result.registered.join(", ") || "nothing new"}${result.reused.length ? `; already here: ${result.reused.join(", ")}` : ""}; downloaded ${fmtBytes(result.downloaded_bytes)} of ${fmtBytes(result.transfer_bytes)}${local}\n`,
        );
      }
    });
}
