// A byte progress bar on stderr for long transfers (pack, unpack, push, pull);
// silent when stderr is not a terminal, so piped output stays clean.
import cliProgress from "cli-progress";
import { fmtBytes } from "./ui.js";

export type ByteBar = { update: (done: number, total: number, step: string) => void; stop: () => void };

export function byteBar(title: string): ByteBar {
  if (!process.stderr.isTTY) return { update: () => {}, stop: () => {} };
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${title} [{bar}] {percentage}% {doneText}/{totalText} {step}`,
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total, step) {
      const payload = { doneText: fmtBytes(done), totalText: fmtBytes(total), step: step.length > 60 ? `…${step.slice(-59)}` : step };
      if (!started) {
        bar.start(Math.max(total, 1), done, payload);
        started = true;
      } else {
        bar.setTotal(Math.max(total, 1));
        bar.update(done, payload);
      }
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
