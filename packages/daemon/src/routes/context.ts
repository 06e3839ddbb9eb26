// What every route module receives: the typed app, the daemon's context, the
// error responses every route may give, and the audit helper for what it touched.
import type { ClusterNode } from "@forkd/cluster";
import type { AdmissionLedger } from "@forkd/core";
import type { E2bContext } from "@forkd/e2b";
import type {
  FastifyBaseLogger,
  FastifyInstance,
  FastifyRequest,
  RawReplyDefaultExpression,
  RawRequestDefaultExpression,
  RawServerDefault,
} from "fastify";
import type { ZodTypeProvider } from "fastify-type-provider-zod";
import type { AgentConnections } from "../agent-connections.js";
import type { AuditLog } from "../audit.js";
import type { EventHub, StateWatcher } from "../events.js";
import type { HotPools } from "../hot-pools.js";
import type { JobRegistry } from "../jobs.js";
import type { Metrics } from "../metrics.js";
import * as S from "../schemas.js";
import type { LatencyWindow } from "../usage.js";

export const ERROR_RESPONSES = { 400: S.ErrorBody, 401: S.ErrorBody, 404: S.ErrorBody, 409: S.ErrorBody, 422: S.ErrorBody };

export type ServerContext = {
  token: string;
  audit: AuditLog;
  metrics: Metrics;
  /** One open agent connection per sandbox (not a hot pool: those are hotPools). */
  agents: AgentConnections;
  /** Work in flight and the limits it is admitted within (sandboxes, BRANCHes, host memory, shmem); over them: 503. */
  admission: AdmissionLedger;
  jobs: JobRegistry;
  /** Hot pools: children kept restored per snapshot, handed out by forks first. */
  hotPools: HotPools;
  /** E2B's planes on the same port (@forkd/e2b): its sandbox records and time limits. */
  e2b: E2bContext;
  /** The daemon's log (stderr): one line a message. */
  log: (line: string) => void;
  /** This node's cluster membership, set once it has joined (undefined: a single host, forkd's behaviour unchanged). */
  cluster?: ClusterNode;
  /** Clients of GET /v1/events, each with a bounded backlog. */
  events: EventHub;
  /** Finds what changed while anyone listens, and publishes it on `events`. */
  watcher: StateWatcher;
  /** Recent child restores, for the metrics summary's rate and percentiles. */
  spawns: LatencyWindow;
  /** Pool hand-outs, for the dashboard's pool latency. */
  poolClaims: LatencyWindow;
};

export type RouteDeps = {
  app: FastifyInstance;
  /** The app with zod schemas typing each route's params, body and reply. */
  r: FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, FastifyBaseLogger, ZodTypeProvider>;
  ctx: ServerContext;
  err: typeof ERROR_RESPONSES;
  touch: typeof touch;
  /** TCP (token) requests: pack paths are confined to $FORKD_HOME/packs (pack-paths.ts); the root-only unix socket is not. */
  confinePackPaths: boolean;
};

/** Record a sandbox or snapshot a request acted on, for its audit line. */
export function touch(request: FastifyRequest, kind: "sandboxes" | "snapshots", value: string | undefined | null): void {
  if (!value) return;
  request.touched ??= { sandboxes: new Set(), snapshots: new Set() };
  request.touched[kind].add(value);
}
