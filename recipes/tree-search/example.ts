// tree-search: a scripted agent (a deterministic policy, no model) fixes the
// bugs in a git repository. At each decision point it live-forks the running
// sandbox N ways (Sandbox.fork: the source keeps running), each branch tries one
// candidate edit, commits it and runs the tests; the branch with the most tests
// passing is kept and the search goes on from inside it. The cold way re-creates
// each explored state from scratch: a fresh sandbox, a fresh clone, the path's
// edits replayed, then the candidate and the tests.
import { Sandbox } from "@forkd/sdk";
import { exampleArgs, ms, report, round, SANDBOX_LIFETIME_MS } from "../shared/report.js";

const TAG = "tree-search";
const REPO = "/work";

type Edit = { file: string; from: string; to: string; label: string };

/** The policy's candidate edits at each decision point, in the order it tries them. */
const DECISIONS: readonly (readonly Edit[])[] = [
  [
    { file: "stats.py", from: "/ (len(xs) + 1)", to: "/ (len(xs) - 1)", label: "mean: n-1" },
    { file: "stats.py", from: "/ (len(xs) + 1)", to: "/ len(xs)", label: "mean: n" },
    { file: "stats.py", from: "/ (len(xs) + 1)", to: "/ (len(xs) + 2)", label: "mean: n+2" },
  ],
  [
    { file: "stats.py", from: "return s[n // 2]", to: "return s[(n - 1) // 2]", label: "median: lower middle" },
    { file: "stats.py", from: "return s[n // 2]", to: "return (s[n // 2 - 1] + s[n // 2]) / 2", label: "median: mean of middles" },
    {
      file: "stats.py",
      from: "return s[n // 2]",
      to: "return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2",
      label: "median: by parity",
    },
  ],
  [
    { file: "stats.py", from: "for x in xs) / len(xs)", to: "for x in xs) / (len(xs) - 1)", label: "variance: n-1" },
    { file: "stats.py", from: "for x in xs) / len(xs)", to: "for x in xs) / len(xs) ** 2", label: "variance: n²" },
    { file: "stats.py", from: "for x in xs) / len(xs)", to: "for x in xs) / (len(xs) + 1)", label: "variance: n+1" },
  ],
];

/** Apply an edit the way an agent's file tool does: read, replace, write; then commit. */
async function applyEdit(sb: Sandbox, root: string, edit: Edit): Promise<void> {
  const file = `${root}/${edit.file}`;
  const text = String(await sb.files.read(file));
  if (!text.includes(edit.from)) throw new Error(`${edit.label}: '${edit.from}' is not in ${file}`);
  await sb.files.write(file, text.replace(edit.from, edit.to));
  await sb.commands.run(`cd ${root} && git commit -qam '${edit.label}'`);
}

/** Tests passing (of those run): the branch's score. */
async function score(sb: Sandbox, root: string): Promise<number> {
  const res = await sb.commands.run(`cd ${root} && python3 -m unittest -v 2>&1 || true`);
  return (res.stdout.match(/ \.\.\. ok$/gm) ?? []).length;
}

async function main(): Promise<void> {
  const args = exampleArgs();
  const width = Math.min(args.n ?? 3, 3);
  const levels = DECISIONS.map((d) => d.slice(0, width));
  const live: Sandbox[] = [];
  const chosen: Edit[] = [];
  const scores: number[][] = [];
  let branches = 0;
  const started = performance.now();
  let current = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
  live.push(current);
  try {
    for (const candidates of levels) {
      // Live fork-to-many: N children of the running sandbox, at its state now.
      const children = await current.fork(candidates.length, { timeoutMs: SANDBOX_LIFETIME_MS });
      live.push(...children);
      const levelScores = await Promise.all(
        children.map(async (child, i) => {
          await applyEdit(child, REPO, candidates[i]!);
          return score(child, REPO);
        }),
      );
      branches += children.length;
      scores.push(levelScores);
      const best = levelScores.indexOf(Math.max(...levelScores));
      chosen.push(candidates[best]!);
      for (const [i, child] of children.entries()) if (i !== best) await child.kill();
      await current.kill();
      current = children[best]!;
    }
    const liveMs = performance.now() - started;
    const finalScore = await score(current, REPO);
    const log = (await current.commands.run(`cd ${REPO} && git log --format=%s | head -n ${levels.length}`)).stdout.trim();

    // The cold way: every state the search explored, rebuilt from nothing.
    const coldStarted = performance.now();
    let coldStates = 0;
    for (const [level, candidates] of levels.entries()) {
      for (const [i, candidate] of candidates.entries()) {
        const sb = await Sandbox.create({ template: TAG, timeoutMs: SANDBOX_LIFETIME_MS });
        try {
          await sb.commands.run(
            "rm -rf /tmp/cold && git clone -q /work /tmp/cold && cd /tmp/cold && git reset -q --hard $(git rev-list --max-parents=0 HEAD)",
          );
          for (const edit of chosen.slice(0, level)) await applyEdit(sb, "/tmp/cold", edit);
          await applyEdit(sb, "/tmp/cold", candidate);
          const coldScore = await score(sb, "/tmp/cold");
          if (coldScore !== scores[level]![i]) throw new Error(`state ${level}.${i} scored ${coldScore} cold, ${scores[level]![i]} live`);
          coldStates++;
        } finally {
          await sb.kill();
        }
      }
    }
    const coldMs = performance.now() - coldStarted;
    const perMin = (count: number, took: number) => (count * 60_000) / took;
    report(
      args,
      `tree-search: ${levels.length} decision points × ${width} branches; kept: ${chosen.map((e) => e.label).join(" → ")}`,
      [
        ["scores per level (tests passing of 6)", scores.map((s) => s.join("/")).join("  ")],
        ["final tests passing", `${finalScore} of 6; commits: ${log.split("\n").reverse().join(", ")}`],
        ["live BRANCH search", `${branches} branches in ${ms(liveMs)} = ${round(perMin(branches, liveMs))} branches/min`],
        ["cold: each state re-created", `${coldStates} states in ${ms(coldMs)} = ${round(perMin(coldStates, coldMs))} states/min`],
        ["speed-up", `${round(perMin(branches, liveMs) / perMin(coldStates, coldMs))}×`],
      ],
      {
        tree_branches_per_min: round(perMin(branches, liveMs)),
        tree_cold_per_min: round(perMin(coldStates, coldMs)),
        tree_branches: branches,
        tree_final_passing: finalScore,
      },
    );
  } finally {
    await Promise.allSettled(live.map((sb) => sb.kill()));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`tree-search: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
