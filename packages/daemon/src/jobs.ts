// Long operations (pack, unpack, push, pull) run as jobs: the request answers 202
// with a job at once, and GET /v1/jobs/:id shows its progress and outcome, so a
// client can draw a bar. Jobs live in the daemon's memory; an interrupted one
// leaves only temp files that cleanup removes.
import { randomBytes } from "node:crypto";
import { isForkdError } from "@forkd/core";

export type JobKind = "pack" | "unpack" | "push" | "pull";
type JobProgress = { done_bytes: number; total_bytes: number; step: string };
export type Job = {
  id: string;
  kind: JobKind;
  status: "running" | "succeeded" | "failed";
  progress: JobProgress;
  result: Record<string, unknown> | null;
  error: { code: string; message: string } | null;
  created_at: string;
  finished_at: string | null;
};

/** Finished jobs kept for clients to read; the oldest go first. */
const KEEP_FINISHED = 200;

export class JobRegistry {
  private readonly jobs = new Map<string, Job>();

  start(kind: JobKind, run: (progress: (done: number, total: number, step: string) => void) => Promise<Record<string, unknown>>): Job {
    const job: Job = {
      id: `job-${randomBytes(6).toString("hex")}`,
      kind,
      status: "running",
      progress: { done_bytes: 0, total_bytes: 0, step: "starting" },
      result: null,
      error: null,
      created_at: new Date().toISOString(),
      finished_at: null,
    };
    this.jobs.set(job.id, job);
    const progress = (done: number, total: number, step: string) => {
      job.progress = { done_bytes: done, total_bytes: total, step };
    };
    void run(progress)
      .then((result) => {
        job.status = "succeeded";
        job.result = result;
      })
      .catch((err: Error) => {
        job.status = "failed";
        job.error = { code: isForkdError(err) ? err.code : "internal", message: err.message };
      })
      .finally(() => {
        job.finished_at = new Date().toISOString();
        this.prune();
      });
    return job;
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  list(): Job[] {
    return [...this.jobs.values()];
  }

  private prune(): void {
    const finished = this.list().filter((j) => j.status !== "running");
    for (const job of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) this.jobs.delete(job.id);
  }
}
