// `forkd bench`: one module per benchmark, sharing bench/report.ts for figures and output.
import type { Command } from "commander";
import { registerApiBench } from "./api.js";
import { registerBootBench } from "./boot.js";
import { registerBranchBench } from "./branch.js";
import { registerChainBench } from "./chain.js";
import { registerChaosBench } from "./chaos.js";
import { registerClusterBench } from "./cluster.js";
import { registerConfineBench } from "./confine.js";
import { registerE2bBench } from "./e2b.js";
import { registerFanoutBench } from "./fanout.js";
import { registerForkLiveBench } from "./fork-live.js";
import { registerFuzzBench } from "./fuzz.js";
import { registerPackBench } from "./pack.js";
import { registerPoolBench } from "./pool.js";
import { registerRecipesBench } from "./recipes.js";
import { registerSoakBench } from "./soak.js";
import { registerSpawnBench } from "./spawn.js";

export function registerBench(program: Command): void {
  const bench = program.command("bench").description("benchmarks that print a table or JSON, with the CPU model and accel mode");
  for (const register of [
    registerBootBench,
    registerSpawnBench,
    registerApiBench,
    registerBranchBench,
    registerFanoutBench,
    registerConfineBench,
    registerChainBench,
    registerPackBench,
    registerPoolBench,
    registerForkLiveBench,
    registerSoakBench,
    registerFuzzBench,
    registerChaosBench,
    registerRecipesBench,
    registerE2bBench,
    registerClusterBench,
  ])
    register(bench);
}
