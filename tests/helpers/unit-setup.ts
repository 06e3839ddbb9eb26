// The unit project runs its files in shared workers (isolate: false: each module is
// evaluated once per worker, not once per file, which is most of the run's CPU). What a
// file changes in process.env (FORKD_HOME, FORKD_RUN_DIR…) is put back after it, so the
// next file in the worker starts from the environment the run started with.
import { afterAll } from "vitest";

const before = { ...process.env };

afterAll(() => {
  for (const name of Object.keys(process.env)) if (!(name in before)) delete process.env[name];
  Object.assign(process.env, before);
});
