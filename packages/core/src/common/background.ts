// Work nobody waits for: reaping a dead sandbox found on the way through a read,
// closing a file a destroyed stream held. Its failure has no caller to reach, and
// an unhandled rejection would end the daemon (Node's default), so it goes to one
// place instead: a process warning, which Node prints on stderr, named by `what`.

/** Run `work` without waiting for it; a failure becomes a warning that names it. */
export function inBackground(what: string, work: Promise<unknown>): void {
  work.catch((err: unknown) => {
    process.emitWarning(`${what}: ${err instanceof Error ? err.message : String(err)}`, {
      type: "ForkdWarning",
      code: "BACKGROUND_FAILURE",
    });
  });
}
