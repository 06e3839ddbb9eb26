// The CLI loads only the module a command lives in (packages/cli/src/commands/index.ts):
// the table must name every top-level command each module registers, and help must
// still list them all.
import { spawnSync } from "node:child_process";
import { COMMAND_MODULES, modulesFor } from "@forkd/cli/commands";
import { Command } from "commander";
import { describe, expect, it } from "vitest";
import { CLI } from "../helpers/env.js";

describe("the CLI's command table", () => {
  it("names exactly the top-level commands each module registers", async () => {
    for (const m of COMMAND_MODULES) {
      const program = new Command();
      (await m.load())(program);
      const names = program.commands.flatMap((c) => [c.name(), ...c.aliases()]);
      expect(names.sort()).toEqual([...m.commands].sort());
    }
  });

  it("loads nothing for --version, the named command's module, and everything for help or an unknown name", () => {
    expect(modulesFor(["--version"])).toEqual([]);
    expect(modulesFor(["-V"])).toEqual([]);
    const ls = modulesFor(["--daemon-url", "unix:/x", "ls", "--json"]);
    expect(ls).toHaveLength(1);
    expect(ls[0]!.commands).toContain("ls");
    expect(modulesFor(["--daemon-token=t", "pool", "ls"])[0]!.commands).toEqual(["pool"]);
    for (const args of [[], ["--help"], ["help", "fork"], ["no-such-command"], ["--no-such-option"]]) {
      expect(modulesFor(args)).toBe(COMMAND_MODULES);
    }
  });

  it("lists every command in forkd --help", () => {
    const res = spawnSync(process.execPath, [CLI, "--help"], { encoding: "utf8" });
    expect(res.status).toBe(0);
    for (const name of COMMAND_MODULES.flatMap((m) => m.commands)) expect(res.stdout).toMatch(new RegExp(`^  ${name}\\b`, "m"));
  });
});
