// Jobs for long operations on snapshots (pack and unpack here; push and pull in
// routes/registry.ts): 202 with the job at once, progress from GET /v1/jobs/:id.
import fs from "node:fs";
import { ForkdError, getSnapshot, packSnapshot, unpackFile, validateName } from "@forkd/core";
import { z } from "zod";
import { packPathFor } from "../pack-paths.js";
import * as S from "../schemas.js";
import type { RouteDeps } from "./context.js";

export function registerJobRoutes({ r, ctx, err, touch, confinePackPaths }: RouteDeps): void {
  r.get("/v1/jobs", { schema: { response: { 200: z.array(S.Job), ...err } } }, async () => ctx.jobs.list());
  r.get("/v1/jobs/:id", { schema: { params: S.JobIdParam, response: { 200: S.Job, ...err } } }, async (request) => {
    const job = ctx.jobs.get(request.params.id);
    if (!job) throw new ForkdError("not_found", `no job ${request.params.id}; jobs are kept in the daemon's memory until it restarts`);
    return job;
  });
  r.post(
    "/v1/snapshots/:tag/pack",
    { schema: { params: S.TagParam, body: S.PackBody, response: { 202: S.Job, ...err } } },
    async (request, reply) => {
      const tag = validateName(request.params.tag, "tag");
      const file = packPathFor(request.body.path, confinePackPaths);
      await getSnapshot(tag);
      if (fs.existsSync(file)) {
        throw new ForkdError("conflict", `${file} already exists; pick a new file name`, { path: file });
      }
      touch(request, "snapshots", tag);
      const job = ctx.jobs.start("pack", async (progress) => {
        const index = await packSnapshot(tag, file, progress);
        return { tag, path: file, pack_bytes: index.pack_bytes, snapshots: index.snapshots };
      });
      return reply.code(202).send(job);
    },
  );
  r.post("/v1/snapshots/unpack", { schema: { body: S.UnpackBody, response: { 202: S.Job, ...err } } }, async (request, reply) => {
    if (request.body.tag !== undefined) validateName(request.body.tag, "tag");
    const file = packPathFor(request.body.path, confinePackPaths);
    if (!fs.existsSync(file)) throw new ForkdError("not_found", `no file ${file} on the daemon's host`);
    const job = ctx.jobs.start("unpack", async (progress) => {
      const result = await unpackFile(file, { ...(request.body.tag ? { tag: request.body.tag } : {}), onProgress: progress });
      return result;
    });
    return reply.code(202).send(job);
  });
}
