// `forkd cluster`: the nodes of the cluster the daemon belongs to (capacity, load,
// what each holds) and drain/undrain of one (no new work placed there).
import type { Command } from "commander";
import { viaApi } from "../backend-daemon.js";
import { fmtBytes, plainTable } from "../ui.js";
import { daemonController } from "./pool.js";

export function registerCluster(program: Command): void {
  const cluster = program.command("cluster").description("the forkd cluster this daemon belongs to (`forkd daemon --cluster etcd://…`)");
  cluster
    .command("ls")
    .description("live nodes: address, sandboxes against their limit, free memory, load, drain flag and the snapshots each holds")
    .option("--json", "print JSON")
    .action(async (opts: { json?: boolean }) => {
      const controller = await daemonController("forkd cluster");
      try {
        const nodes = await viaApi(() => controller.clusterNodes());
        if (opts.json) {
          process.stdout.write(`${JSON.stringify(nodes, null, 2)}\n`);
          return;
        }
        const table = plainTable(["NODE", "URL", "SANDBOXES", "MEM FREE", "LOAD", "STATE", "SNAPSHOTS"]);
        for (const n of nodes) {
          table.push([
            `${n.name}${n.self ? " *" : ""}`,
            n.url,
            `${n.capacity.sandboxes}/${n.capacity.max_sandboxes}`,
            fmtBytes(n.capacity.memory_free_bytes),
            n.load.toFixed(2),
            n.draining ? "draining" : "ready",
            n.snapshots.map((s) => (s.presence === "on_disk" ? s.tag : `${s.tag} (${s.presence.replace("_", " ")})`)).join(", ") || "-",
          ]);
        }
        process.stdout.write(`${table.toString()}\n`);
      } finally {
        await controller.close();
      }
    });
  for (const [name, draining] of [
    ["drain", true],
    ["undrain", false],
  ] as const) {
    cluster
      .command(name)
      .description(draining ? "place no new work on NODE (what runs there keeps running)" : "place work on NODE again")
      .argument("<node>")
      .option("--json", "print JSON")
      .action(async (node: string, opts: { json?: boolean }) => {
        const controller = await daemonController("forkd cluster");
        try {
          const result = await viaApi(() => controller.setDraining(node, draining));
          process.stdout.write(opts.json ? `${JSON.stringify(result)}\n` : `${result.name}: ${result.draining ? "draining" : "ready"}\n`);
        } finally {
          await controller.close();
        }
      });
  }
}
