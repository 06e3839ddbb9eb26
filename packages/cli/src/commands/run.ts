import { chooseAccel, ForkdError, parseAccel, Vm } from "@forkd/core";
import type { Command } from "commander";
import { fmtMs, parseIntOption, withSpinner } from "../ui.js";

type RunOpts = { image: string; memoryMib: number; vcpus: number; accel?: string; net: boolean; timeoutMs?: number; timings: boolean };

export function registerRun(program: Command): void {
  program
    .command("run")
    .description("boot a fresh VM, run one command in it, stream its output, exit with its status, tear the VM down")
    .option("--image <name>", "guest image", "base")
    .option("--memory-mib <n>", "guest memory in MiB", parseIntOption("--memory-mib"), 256)
    .option("--vcpus <n>", "virtual CPUs", parseIntOption("--vcpus"), 1)
    .option("--accel <mode>", "kvm or tcg (default: chosen automatically, see `forkd doctor`)")
    .option("--no-net", "no network device in the guest")
    .option("--timeout-ms <n>", "kill the command after this long", parseIntOption("--timeout-ms"))
    .option("--no-timings", "do not print the timing line on stderr")
    .argument("[command...]", "the command and its arguments, after --")
    .usage("[options] -- CMD [ARGS...]")
    .action(async (command: string[], opts: RunOpts) => {
      if (command.length === 0) {
        throw new ForkdError(
          "bad_request",
          "missing command: usage is `forkd run [options] -- CMD [ARGS...]`, for example `forkd run -- uname -a`",
        );
      }
      process.exitCode = await runOnce(command, opts);
    });
}

async function runOnce(command: string[], opts: RunOpts): Promise<number> {
  const accel = opts.accel ? parseAccel(opts.accel) : (await chooseAccel()).accel;
  const abort = new AbortController();
  let vm: Vm | undefined;
  const onSignal = () => {
    abort.abort();
    (vm?.destroy() ?? Promise.resolve())
      .catch((err: Error) => process.stderr.write(`forkd: could not stop the VM: ${err.message}\n`))
      .finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    const booted = await withSpinner(`booting a ${accel.toUpperCase()} VM from image '${opts.image}'`, () =>
      Vm.boot({
        image: opts.image,
        memoryMib: opts.memoryMib,
        vcpus: opts.vcpus,
        accel,
        network: opts.net,
        ephemeral: true,
        signal: abort.signal,
      }),
    );
    vm = booted.vm;
    const started = performance.now();
    const result = await vm.agent.exec(
      { argv: command, ...(opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {}) },
      { onStdout: (d) => process.stdout.write(d), onStderr: (d) => process.stderr.write(d), maxOutputBytes: Number.POSITIVE_INFINITY },
    );
    const execMs = performance.now() - started;
    const t = performance.now();
    await vm.destroy();
    const teardownMs = performance.now() - t;
    if (opts.timings) {
      process.stderr.write(
        `forkd: ${accel} boot ${fmtMs(booted.timings.totalMs)} (qemu ${fmtMs(booted.timings.launchMs + booted.timings.qmpMs)}, guest to agent ${fmtMs(booted.timings.agentMs)}) · exec ${fmtMs(execMs)} · teardown ${fmtMs(teardownMs)}${result.timedOut ? " · command timed out" : ""}\n`,
      );
    }
    if (result.exitCode !== null) return result.exitCode;
    return 128 + signalNumber(result.signal);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await vm?.destroy();
  }
}

function signalNumber(name: string | null): number {
  const table: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGABRT: 6, SIGKILL: 9, SIGSEGV: 11, SIGPIPE: 13, SIGTERM: 15 };
  return (name && table[name]) || 1;
}
