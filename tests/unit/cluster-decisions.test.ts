// The cluster's decisions without etcd or VMs: where a request goes (served here,
// forwarded, unreachable, a kill deferred, a merged list), what a node publishes to
// the catalog, which calls start new work or change what runs, which tag a call
// creates, and the checks on what comes from flags and from etcd.
import {
  catalogDiff,
  changesSandboxes,
  isNewWork,
  mergedListOf,
  parseEtcdUrl,
  planRequest,
  sandboxIdOf,
  tagCreatedBy,
  validateAdvertiseUrl,
  validateNodeName,
} from "@forkd/cluster";
import { describe, expect, it } from "vitest";

const ID = "sb-0123456789ab";
const base = { self: "a", runsHere: () => false, owner: undefined as string | undefined, liveNodes: new Set(["a", "b"]) };

describe("planRequest", () => {
  it("forwards a call for a sandbox the catalog puts on another live node, whatever the route under it", () => {
    for (const [method, path] of [
      ["POST", `/v1/sandboxes/${ID}/exec/stream`],
      ["POST", `/v1/sandboxes/${ID}/files`],
      ["POST", `/v1/sandboxes/${ID}/branch`],
      ["GET", `/v1/sandboxes/${ID}`],
      ["DELETE", `/v1/sandboxes/${ID}`],
      ["GET", `/v1/sandboxes/${ID}/processes/12/output?offset=0`],
    ]) {
      expect(planRequest({ ...base, method: method!, path: path!, forwarded: false, owner: "b" })).toEqual({ kind: "forward", node: "b" });
    }
  });

  it("never forwards a forwarded request (one hop), nor a sandbox this node runs", () => {
    expect(planRequest({ ...base, method: "POST", path: `/v1/sandboxes/${ID}/exec`, forwarded: true, owner: "b" })).toEqual({
      kind: "local",
    });
    expect(
      planRequest({ ...base, method: "POST", path: `/v1/sandboxes/${ID}/exec`, forwarded: false, owner: "b", runsHere: () => true }),
    ).toEqual({ kind: "local" });
    // A forwarded list is this node's own list, not merged again.
    expect(planRequest({ ...base, method: "GET", path: "/v1/sandboxes", forwarded: true })).toEqual({ kind: "local" });
  });

  it("serves here what no node catalogued (the route answers 404) and what the catalog says is its own", () => {
    expect(planRequest({ ...base, method: "GET", path: `/v1/sandboxes/${ID}`, forwarded: false })).toEqual({ kind: "local" });
    expect(planRequest({ ...base, method: "GET", path: `/v1/sandboxes/${ID}`, forwarded: false, owner: "a" })).toEqual({ kind: "local" });
  });

  it("answers unreachable for a sandbox on a node without a lease, and defers a kill of it", () => {
    const gone = { ...base, owner: "c", forwarded: false };
    expect(planRequest({ ...gone, method: "POST", path: `/v1/sandboxes/${ID}/exec` })).toEqual({ kind: "unreachable", node: "c" });
    expect(planRequest({ ...gone, method: "DELETE", path: `/v1/sandboxes/${ID}` })).toEqual({ kind: "deferred_delete", node: "c", id: ID });
    // A process's DELETE is not a kill of the sandbox: it waits for the node like any call.
    expect(planRequest({ ...gone, method: "DELETE", path: `/v1/sandboxes/${ID}/processes/3` })).toEqual({ kind: "unreachable", node: "c" });
  });

  it("merges the two lists (query kept by the caller), nothing else", () => {
    expect(planRequest({ ...base, method: "GET", path: "/v1/sandboxes?pool=true", forwarded: false })).toEqual({
      kind: "merge",
      list: "sandboxes",
    });
    expect(planRequest({ ...base, method: "GET", path: "/v1/snapshots", forwarded: false })).toEqual({ kind: "merge", list: "snapshots" });
    expect(mergedListOf("POST", "/v1/sandboxes")).toBeUndefined();
    expect(mergedListOf("GET", "/v1/pools")).toBeUndefined();
    expect(planRequest({ ...base, method: "POST", path: "/v1/sandboxes", forwarded: false })).toEqual({ kind: "local" });
  });

  it("reads the sandbox id of a path only from /v1/sandboxes/ID", () => {
    expect(sandboxIdOf(`/v1/sandboxes/${ID}`)).toBe(ID);
    expect(sandboxIdOf(`/v1/sandboxes/${ID}/exec?x=1`)).toBe(ID);
    expect(sandboxIdOf("/v1/sandboxes")).toBeUndefined();
    expect(sandboxIdOf("/v1/snapshots/base")).toBeUndefined();
  });
});

describe("catalogDiff", () => {
  it("puts what runs here and is not published, removes only its own stale entries, and reports ids another node claims", () => {
    const published = new Map([
      ["sb-1", "a"],
      ["sb-2", "a"],
      ["sb-3", "b"],
      ["sb-9", "b"],
    ]);
    expect(catalogDiff("a", ["sb-1", "sb-4", "sb-9"], published)).toEqual({ put: ["sb-4"], remove: ["sb-2"], foreign: ["sb-9"] });
    // Another node's entries are never removed by this one.
    expect(catalogDiff("a", [], published).remove).toEqual(["sb-1", "sb-2"]);
  });
});

describe("which calls", () => {
  it("start new work (refused while the node holds no lease) — calls on what runs do not", () => {
    for (const [m, p] of [
      ["POST", "/v1/sandboxes"],
      ["POST", `/v1/sandboxes/${ID}/fork`],
      ["POST", `/v1/sandboxes/${ID}/branch`],
      ["POST", "/v1/snapshots"],
      ["POST", "/v1/snapshots/pull"],
      ["PUT", "/v1/snapshots/base/pool"],
      ["POST", "/v1/workspaces/w/resume"],
    ]) {
      expect(isNewWork(m!, p!), `${m} ${p}`).toBe(true);
    }
    for (const [m, p] of [
      ["POST", `/v1/sandboxes/${ID}/exec`],
      ["DELETE", `/v1/sandboxes/${ID}`],
      ["GET", "/v1/sandboxes"],
      ["DELETE", "/v1/snapshots/base"],
    ]) {
      expect(isNewWork(m!, p!), `${m} ${p}`).toBe(false);
    }
  });

  it("change what runs here (the catalog is synced before their answer leaves)", () => {
    expect(changesSandboxes("POST", "/v1/sandboxes")).toBe(true);
    expect(changesSandboxes("DELETE", `/v1/sandboxes/${ID}`)).toBe(true);
    expect(changesSandboxes("POST", `/v1/sandboxes/${ID}/fork`)).toBe(true);
    expect(changesSandboxes("DELETE", "/v1/snapshots/base?force=true")).toBe(true);
    expect(changesSandboxes("POST", `/v1/sandboxes/${ID}/exec`)).toBe(false);
    expect(changesSandboxes("GET", "/v1/sandboxes")).toBe(false);
  });

  it("create a tag, and which", () => {
    expect(tagCreatedBy("POST", "/v1/snapshots", { tag: "t1", image: "base" })).toBe("t1");
    expect(tagCreatedBy("POST", "/v1/sandboxes/:id/branch", { tag: "t2" })).toBe("t2");
    expect(tagCreatedBy("POST", "/v1/sandboxes/:id/branch", {})).toBeUndefined();
    expect(tagCreatedBy("POST", "/v1/snapshots/:tag/compact", { to: "t3" })).toBe("t3");
    expect(tagCreatedBy("POST", "/v1/snapshots/pull", { tag: "t4" })).toBeUndefined();
    expect(tagCreatedBy("GET", "/v1/snapshots", undefined)).toBeUndefined();
  });
});

describe("what comes from flags and from etcd is checked", () => {
  it("parses etcd://HOST:PORT[,HOST:PORT] and refuses anything else", () => {
    expect(parseEtcdUrl("etcd://127.0.0.1:2379")).toEqual(["http://127.0.0.1:2379"]);
    expect(parseEtcdUrl("etcd://10.0.0.5:2379,etcd-1.local:2379/")).toEqual(["http://10.0.0.5:2379", "http://etcd-1.local:2379"]);
    for (const bad of [
      "http://127.0.0.1:2379",
      "etcd://host",
      "etcd://host:0",
      "etcd://a:1/path",
      "etcd://-x:1",
      "etcd://a:1;rm -rf /:2",
    ]) {
      expect(() => parseEtcdUrl(bad), bad).toThrow(/--cluster/);
    }
  });

  it("takes node names that are one key part, and advertise URLs that are an origin", () => {
    expect(validateNodeName("node-1.rack_2")).toBe("node-1.rack_2");
    for (const bad of ["", "a/b", "..", "a..b", "-a", "a".repeat(64), "a b", "a\n"])
      expect(() => validateNodeName(bad), bad).toThrow(/node name/);
    expect(validateAdvertiseUrl("http://10.0.0.5:7070/")).toBe("http://10.0.0.5:7070");
    expect(validateAdvertiseUrl("https://node-a:7070")).toBe("https://node-a:7070");
    for (const bad of ["ftp://a:1", "http://user:pw@a:1", "http://a:1/v1", "http://a:1?x=1", "http://a:1#f", "a:1", "unix:/run/x"]) {
      expect(() => validateAdvertiseUrl(bad), bad).toThrow(/advertise URL/);
    }
  });
});
