import { spawn } from "node:child_process";
import { ForkdError } from "./errors.js";

export type RunResult = { stdout: string; stderr: string; code: number };

/** Run a host program with an argv (never a shell string) and collect its output. */
export function runProgram(
  file: string,
  args: string[],
  opts: { input?: Buffer | string; cwd?: string; timeoutMs?: number } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd: opts.cwd, stdio: ["pipe", "pipe", "pipe"], timeout: opts.timeoutMs });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") {
        reject(new ForkdError("missing_dependency", `${file} is not installed; run \`npm run setup\` (or \`forkd doctor\`) for the fix`));
      } else reject(err);
    });
    child.on("close", (code) => resolve({ stdout, stderr, code: code ?? -1 }));
    child.stdin.on("error", () => {});
    child.stdin.end(opts.input);
  });
}

export async function runChecked(file: string, args: string[], opts: Parameters<typeof runProgram>[2] = {}): Promise<RunResult> {
  const result = await runProgram(file, args, opts);
  if (result.code !== 0) {
    throw new ForkdError("io_error", `${file} ${args.join(" ")} exited with ${result.code}: ${result.stderr.trim().slice(0, 2000)}`);
  }
  return result;
}
