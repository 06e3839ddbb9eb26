// postgres-fixture: every test gets its own database by forking a parent whose
// PostgreSQL is already running with the schema and seed loaded. Measured in the
// same run: fork → first query answered, against the cold way (initdb, start,
// schema, seed, first query) in a sandbox of the same kind.
import { Sandbox } from "@forkd/sdk";
import { exampleArgs, median, ms, report, round, SANDBOX_LIFETIME_MS, timed } from "../shared/report.js";

const TAG = "postgres-fixture";
const QUERY = "SELECT count(*) FROM orders JOIN customers ON customers.id = orders.customer_id WHERE country = 'JP'";

/** psql as the postgres user on the fixture's socket; output unaligned, tuples only. */
function psql(port: number, sql: string): string {
  return `runuser -u postgres -- psql -qAt -v ON_ERROR_STOP=1 -h /var/run/postgresql -p ${port} -d app -c "${sql}"`;
}

async function main(): Promise<void> {
  const args = exampleArgs();
  const n = args.n ?? 3;
  const forks: number[] = [];
  let expected: string | undefined;
  const sandboxes: Sandbox[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const { value, ms: took } = await timed(async () => {
        const sb = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
        sandboxes.push(sb);
        return (await sb.commands.run(psql(5432, QUERY))).stdout.trim();
      });
      if (expected !== undefined && value !== expected) throw new Error(`fork ${i} answered ${value}, fork 0 ${expected}`);
      expected = value;
      forks.push(took);
    }
    // Each fork is its own database: a row written in one is absent from the others.
    const [first, second] = sandboxes;
    let isolated = true;
    if (first && second) {
      await first.commands.run(psql(5432, "DELETE FROM orders WHERE id <= 100"));
      const mine = (await first.commands.run(psql(5432, "SELECT count(*) FROM orders"))).stdout.trim();
      const theirs = (await second.commands.run(psql(5432, "SELECT count(*) FROM orders"))).stdout.trim();
      isolated = mine === "19900" && theirs === "20000";
      if (!isolated) throw new Error(`forks share a database: ${mine} rows in one, ${theirs} in the other`);
    }
    // The cold way, in a sandbox of the same kind: a fresh cluster on another port.
    const coldBox = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
    sandboxes.push(coldBox);
    const cold = await timed(async () => {
      await coldBox.commands.run("/opt/recipe/pg-fixture.sh /var/lib/recipe/cold 5433", { timeoutMs: 600_000 });
      return (await coldBox.commands.run(psql(5433, QUERY))).stdout.trim();
    });
    if (cold.value !== expected) throw new Error(`the cold fixture answered ${cold.value}, the forks ${expected}`);
    const forkMs = median(forks);
    report(
      args,
      `postgres-fixture: ${n} forks, each answering its first query (${expected} JP orders)`,
      [
        ["fork → first query (median)", `${ms(forkMs)}  (each: ${forks.map(ms).join(", ")})`],
        ["cold: initdb + start + seed + query", ms(cold.ms)],
        ["speed-up", `${round(cold.ms / forkMs)}×`],
        ["forks isolated", isolated ? "yes (a delete in one fork is not seen by another)" : "no"],
      ],
      { postgres_fork_query_ms: round(forkMs), postgres_cold_ms: round(cold.ms), postgres_forks: n },
    );
  } finally {
    await Promise.allSettled(sandboxes.map((sb) => sb.kill()));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`postgres-fixture: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
