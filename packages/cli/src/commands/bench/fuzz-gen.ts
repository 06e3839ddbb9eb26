// Requests for `forkd bench fuzz`, generated with fast-check from the daemon's own
// OpenAPI document: a request each operation's schema allows, then one mutation of
// it (wrong types, missing and extra fields, huge values, bad ids, bad content
// types, truncated bodies, huge query strings, bad auth). Deterministic per seed.
//
// Only the operations known to be safe (reads, and calls into a sandbox's agent)
// may be sent valid, against the live sandboxes, so the fuzz reaches the guest
// agent. Every other one (create a snapshot, sandbox or pool, fork, BRANCH,
// pack/push/pull, workspaces, deletes, and any route added later) is only ever
// sent in a form the daemon must refuse before doing anything: an unknown field in
// its strict body, and ids that name nothing.
import fc from "fast-check";

type JsonSchema = {
  type?: string;
  enum?: unknown[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: boolean | JsonSchema;
  items?: JsonSchema;
  minItems?: number;
  maxItems?: number;
  minimum?: number;
  maximum?: number;
  nullable?: boolean;
  oneOf?: JsonSchema[];
  anyOf?: JsonSchema[];
  description?: string;
};

type OpenApiParam = { name: string; in: "path" | "query" | "header"; required?: boolean; schema?: JsonSchema };
type OpenApiOp = { parameters?: OpenApiParam[]; requestBody?: { required?: boolean; content?: Record<string, { schema?: JsonSchema }> } };
export type OpenApiDoc = { paths: Record<string, Record<string, OpenApiOp>> };

export type Operation = {
  method: string;
  /** The templated path, e.g. /v1/sandboxes/{id}/exec. */
  path: string;
  params: OpenApiParam[];
  body?: JsonSchema;
  bodyRequired: boolean;
  /** Valid, it would start real work (VMs, snapshots, network): only ever sent invalid. */
  guarded: boolean;
};

/** What the daemon under test has: requests to safe operations may name them. */
export type Known = { sandboxIds: string[]; tags: string[]; pids: string[] };

export type FuzzRequest = {
  op: string;
  mutation: string;
  method: string;
  /** Request target as sent (path and query, already encoded). */
  target: string;
  headers: Record<string, string>;
  body?: Buffer;
};

/** The one key no strict body schema of ours has: a body carrying it must be refused (422) before anything runs. */
export const GUARD_KEY = "fuzz_unknown_field";

/** The operations that may be sent valid; everything else is guarded. */
const SAFE = [/^GET /, /^POST \/v1\/sandboxes\/\{id\}\/(ping|exec|exec\/stream|eval|files|processes\/\{pid\}\/stdin)$/];

export function operations(doc: OpenApiDoc): Operation[] {
  const out: Operation[] = [];
  for (const [route, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const upper = method.toUpperCase();
      const body = op.requestBody?.content?.["application/json"]?.schema;
      out.push({
        method: upper,
        path: route,
        params: op.parameters ?? [],
        ...(body ? { body } : {}),
        bodyRequired: op.requestBody?.required === true,
        guarded: !SAFE.some((re) => re.test(`${upper} ${route}`)),
      });
    }
  }
  return out;
}

const weird = fc.constantFrom(
  "",
  " ",
  "..",
  "../../etc/passwd",
  "sb-000000000000",
  "sb-ffffffffffff",
  "sb-",
  "job-000000000000",
  "\u0000",
  "%",
  "%00",
  "\u202e\u0301",
  "😀",
  "a".repeat(300),
  "a".repeat(5000),
  "__proto__",
  "constructor",
  "-1",
  "0",
  "99999999",
  "null",
  "true",
);
const garbage = fc.oneof(fc.string({ maxLength: 40 }), fc.string({ unit: "binary", maxLength: 20 }), weird);
/** Strings a schema's `string` allows that a guest program, path or environment cannot take. */
const nasty = fc.constantFrom("\0", "a\0b", "\u0001\u007f", "line\nbreak", "A=B", "=", "$(id)", "-rf", "--", "\ud800", "a".repeat(70_000));
const anyString = (maxLength: number) =>
  fc.oneof({ arbitrary: fc.string({ maxLength }), weight: 4 }, { arbitrary: nasty, weight: 1 }, { arbitrary: weird, weight: 1 });

/** A value the schema allows (bounded in size), biased toward the ids and tags that exist for safe operations. */
function valueFor(schema: JsonSchema | undefined, known: Known, name: string, safe: boolean, depth = 0): fc.Arbitrary<unknown> {
  if (!schema || depth > 6) return fc.jsonValue({ maxDepth: 2 });
  const base = baseValue(schema, known, name, safe, depth);
  return schema.nullable ? fc.oneof(base, fc.constant(null)) : base;
}

function baseValue(schema: JsonSchema, known: Known, name: string, safe: boolean, depth: number): fc.Arbitrary<unknown> {
  if (schema.enum) return fc.constantFrom(...schema.enum);
  const alts = schema.oneOf ?? schema.anyOf;
  if (alts?.length) return fc.oneof(...alts.map((s) => valueFor(s, known, name, safe, depth + 1)));
  switch (schema.type) {
    case "object": {
      const props = schema.properties ?? {};
      const required = schema.required ?? [];
      const fields = Object.fromEntries(Object.entries(props).map(([k, s]) => [k, valueFor(s, known, k, safe, depth + 1)]));
      if (Object.keys(fields).length === 0 && typeof schema.additionalProperties === "object") {
        return fc.dictionary(anyString(12), valueFor(schema.additionalProperties, known, name, safe, depth + 1), {
          maxKeys: 3,
        });
      }
      return fc.record(fields, { requiredKeys: required });
    }
    case "array": {
      const min = schema.minItems ?? 0;
      const max = Math.min(schema.maxItems ?? 4, min + 4);
      return fc.array(valueFor(schema.items, known, name, safe, depth + 1), { minLength: min, maxLength: max });
    }
    case "integer":
      return fc.integer({ min: Math.max(schema.minimum ?? -1000, -1000), max: Math.min(schema.maximum ?? 100_000, 100_000) });
    case "number":
      return fc.oneof(fc.integer({ min: -10, max: 100_000 }), fc.double({ noNaN: true, min: -1e6, max: 1e6 }));
    case "boolean":
      return fc.boolean();
    case "string":
      return stringFor(name, known, safe);
    default:
      return fc.jsonValue({ maxDepth: 2 });
  }
}

function stringFor(name: string, known: Known, safe: boolean): fc.Arbitrary<string> {
  const plain = anyString(24);
  // Guarded operations never name what exists: a fork or a delete of a real thing is real work.
  if (/tag|^to$|name/.test(name) && safe && known.tags.length) return fc.oneof(fc.constantFrom(...known.tags), plain);
  // Under /tmp/fuzz only: a valid recursive remove of / would break the guest the fuzz runs against, not the daemon.
  // (The agent refuses to remove / itself; /proc/self/mem cannot be read; / cannot be written.)
  if (name === "path")
    return fc.oneof(
      fc.constantFrom("/tmp/fuzz", "/tmp/fuzz/a/b", "/tmp/fuzz/../fuzz/x", "/", "/proc/self/mem", "/tmp/fuzz\0x", "relative", ""),
      plain,
    );
  if (name === "code") return fc.oneof(fc.constantFrom("1 + 1", "throw new Error('x')", "'s'.repeat(3)", "None", "1/0", ")"), plain);
  return plain;
}

function pathParam(p: OpenApiParam, known: Known, safe: boolean): fc.Arbitrary<string> {
  const pool = p.name === "id" ? known.sandboxIds : p.name === "tag" ? known.tags : p.name === "pid" ? known.pids : [];
  return safe && pool.length ? fc.oneof({ arbitrary: fc.constantFrom(...pool), weight: 3 }, { arbitrary: garbage, weight: 1 }) : garbage;
}

const otherType = fc.constantFrom<unknown>(123, -1, 1.5, "str", true, false, null, [], {}, [1, "a"], { a: { b: [] } }, 0);
const hugeValue = fc.constantFrom<unknown>(
  1e308,
  -1e308,
  2 ** 53 + 2,
  2 ** 31 + 1,
  -(2 ** 31),
  Number.MAX_SAFE_INTEGER,
  4_294_967_296,
  "x".repeat(200_000),
  Array.from({ length: 10_000 }, (_, i) => i),
  Array.from({ length: 2000 }, () => "sb-000000000000"),
);
const badContentTypes = fc.constantFrom(
  "text/plain",
  "application/x-www-form-urlencoded",
  "multipart/form-data; boundary=x",
  "application/json; charset=utf-16",
  "application/xml",
  "application/jsonx",
  "*/*",
  "",
);

type Mutation =
  | "valid"
  | "wrong_type"
  | "missing_field"
  | "extra_field"
  | "huge_value"
  | "bad_id"
  | "bad_content_type"
  | "truncated_body"
  | "random_body"
  | "deep_nesting"
  | "huge_query"
  | "bad_query"
  | "no_auth"
  | "wrong_method";

const MUTATIONS: Mutation[] = [
  "valid",
  "wrong_type",
  "missing_field",
  "extra_field",
  "huge_value",
  "bad_id",
  "bad_content_type",
  "truncated_body",
  "random_body",
  "deep_nesting",
  "huge_query",
  "bad_query",
  "no_auth",
  "wrong_method",
];

type Draft = { params: Record<string, string>; query: Record<string, string | undefined>; body: unknown; hasBody: boolean };

function draftFor(op: Operation, known: Known): fc.Arbitrary<Draft> {
  const safe = !op.guarded;
  const params = Object.fromEntries(op.params.filter((p) => p.in === "path").map((p) => [p.name, pathParam(p, known, safe)]));
  const query = Object.fromEntries(
    op.params.filter((p) => p.in === "query").map((p) => [p.name, valueFor(p.schema, known, p.name, safe).map(String)]),
  );
  return fc.record({
    params: fc.record(params),
    query: fc.record(query, { requiredKeys: [] }),
    body: op.body ? valueFor(op.body, known, "", safe) : fc.constant(undefined),
    hasBody: op.body ? (op.bodyRequired ? fc.constant(true) : fc.boolean()) : fc.constant(false),
  });
}

function encodeTarget(op: Operation, d: Draft, rawParams: boolean): string {
  const path = op.path.replace(/\{(\w+)\}/g, (_, name: string) => {
    const v = d.params[name] ?? "";
    return rawParams ? v.replace(/[\r\n ]/g, "_") : encodeURIComponent(v);
  });
  const q = new URLSearchParams(Object.entries(d.query).filter((e): e is [string, string] => e[1] !== undefined)).toString();
  return q ? `${path}?${q}` : path;
}

/** Pick a top-level key of an object body (required ones first), if there is one. */
function someKey(body: unknown, schema: JsonSchema | undefined, pick: number): string | undefined {
  if (typeof body !== "object" || body === null || Array.isArray(body)) return undefined;
  const keys = [...new Set([...(schema?.required ?? []), ...Object.keys(body)])];
  return keys.length ? keys[pick % keys.length] : undefined;
}

function tryParse(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function deepJson(depth: number): string {
  return `${"[".repeat(depth)}${"]".repeat(depth)}`;
}

/** One request per draw: an operation, a draft of it, and a mutation, all from the seed. */
export function requestArbitrary(ops: Operation[], known: Known, token: string): fc.Arbitrary<FuzzRequest> {
  return fc
    .record({
      op: fc.constantFrom(...ops),
      mutation: fc.constantFrom(...MUTATIONS),
      pick: fc.nat(),
      other: otherType,
      huge: hugeValue,
      extraKey: fc.string({ minLength: 1, maxLength: 16 }),
      extraValue: fc.jsonValue({ maxDepth: 2 }),
      contentType: badContentTypes,
      randomBody: fc.oneof(
        fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v) ?? "null"),
        fc.string({ unit: "binary", maxLength: 64 }),
      ),
      cut: fc.double({ min: 0, max: 1, noNaN: true }),
      queryLength: fc.integer({ min: 4096, max: 65_536 }),
      depth: fc.integer({ min: 1000, max: 100_000 }),
      method: fc.constantFrom("PUT", "PATCH", "OPTIONS", "TRACE", "POST", "GET", "DELETE"),
    })
    .chain((r) => draftFor(r.op, known).map((d) => build(r, d, token)));
}

function build(
  r: {
    op: Operation;
    mutation: Mutation;
    pick: number;
    other: unknown;
    huge: unknown;
    extraKey: string;
    extraValue: unknown;
    contentType: string;
    randomBody: string;
    cut: number;
    queryLength: number;
    depth: number;
    method: string;
  },
  d: Draft,
  token: string,
): FuzzRequest {
  const { op } = r;
  let method = op.method;
  let body = d.hasBody ? d.body : undefined;
  let text: string | undefined;
  let contentType = "application/json";
  let auth = `Bearer ${token}`;
  let rawParams = false;
  let suffix = "";
  const key = someKey(body, op.body, r.pick);
  switch (r.mutation) {
    case "valid":
      break;
    case "wrong_type":
      if (key && typeof body === "object" && body !== null) body = { ...(body as object), [key]: r.other };
      else body = r.other;
      break;
    case "missing_field":
      if (key && typeof body === "object" && body !== null) {
        const copy = { ...(body as Record<string, unknown>) };
        delete copy[key];
        body = copy;
      } else body = undefined;
      break;
    case "extra_field":
      body = { ...(typeof body === "object" && body !== null && !Array.isArray(body) ? body : {}), [r.extraKey]: r.extraValue };
      break;
    case "huge_value":
      if (key && typeof body === "object" && body !== null) body = { ...(body as object), [key]: r.huge };
      else body = r.huge;
      break;
    case "bad_id":
      for (const name of Object.keys(d.params)) d.params[name] = `${d.params[name]}\u00ff/../${r.extraKey}`;
      rawParams = r.pick % 2 === 0;
      break;
    case "bad_content_type":
      contentType = r.contentType;
      body ??= {};
      break;
    case "truncated_body": {
      const full = JSON.stringify(body ?? { a: [1, 2, 3] }) ?? "{}";
      text = full.slice(0, Math.floor(full.length * r.cut));
      break;
    }
    case "random_body":
      text = r.randomBody;
      break;
    case "deep_nesting":
      text = r.pick % 2 === 0 ? deepJson(r.depth) : `{"a":${deepJson(r.depth)}}`;
      break;
    case "huge_query":
      suffix = `x=${"A".repeat(r.queryLength)}`;
      break;
    case "bad_query":
      suffix = `${encodeURIComponent(r.extraKey)}=${encodeURIComponent(JSON.stringify(r.extraValue) ?? "")}&force=maybe&force=true`;
      break;
    case "no_auth":
      auth = r.pick % 2 === 0 ? "" : `Bearer ${token.slice(0, -1)}x`;
      break;
    case "wrong_method":
      // Another method on the same path may be another operation (DELETE of a real sandbox): never with a real id.
      method = r.method;
      for (const name of Object.keys(d.params)) d.params[name] = `x${r.extraKey}`;
      break;
  }
  // A guarded operation's body always carries the key its strict schema refuses:
  // whatever else was drawn, it is refused before any work starts.
  if (op.guarded && op.body && text === undefined) {
    body = { ...(typeof body === "object" && body !== null && !Array.isArray(body) ? body : { value: body ?? null }), [GUARD_KEY]: true };
  }
  if (text === undefined && body !== undefined) text = JSON.stringify(body);
  // Raw bodies too: one that happens to parse to an object gets the key as well.
  if (op.guarded && text !== undefined) {
    const parsed = tryParse(text);
    if (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed) && !(GUARD_KEY in parsed)) {
      // Spliced in as text: re-serialising a deeply nested body would overflow the stack.
      const rest = text.trimStart().slice(1);
      text = Object.keys(parsed).length === 0 ? `{"${GUARD_KEY}":true}` : `{"${GUARD_KEY}":true,${rest}`;
    }
  }
  let target = encodeTarget(op, d, rawParams);
  if (suffix) target += `${target.includes("?") ? "&" : "?"}${suffix}`;
  const headers: Record<string, string> = {};
  if (auth) headers.authorization = auth;
  if (text !== undefined) headers["content-type"] = contentType;
  return {
    op: `${op.method} ${op.path}`,
    mutation: r.mutation,
    method,
    target,
    headers,
    ...(text !== undefined ? { body: Buffer.from(text, "utf8") } : {}),
  };
}
