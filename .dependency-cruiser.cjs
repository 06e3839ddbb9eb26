// The import rules `npm test` enforces (ARCHITECTURE.md explains the layers):
// no cycles anywhere, and in core a folder imports only from folders below it.
/** Core's folders, lowest first. */
const CORE_LAYERS = ["common", "vmm", "guest", "store", "net", "hub", "boot", "warm", "sandbox", "pool", "branch", "ops"];
/** Packages, lowest first, with the packages each may import. */
const PACKAGES = {
  atomic: [],
  // The page: a browser bundle that talks to the daemon over HTTP only.
  dashboard: [],
  agent: ["atomic"],
  core: ["atomic", "agent"],
  e2b: ["atomic", "agent", "core"],
  // The cluster layer: above core, beside the daemon (which runs it); never the other way.
  cluster: ["atomic", "agent", "core"],
  daemon: ["atomic", "agent", "core", "e2b", "cluster"],
  // The SDK is a client: of the daemon it takes the API's types only (rule below).
  sdk: ["daemon"],
  mcp: ["sdk"],
  cli: ["atomic", "agent", "core", "e2b", "cluster", "daemon", "sdk", "mcp"],
};

const layerRules = CORE_LAYERS.slice(0, -1).map((layer, i) => ({
  name: `core-${layer}-imports-only-below`,
  severity: "error",
  comment: `core/src/${layer} may import only from ${CORE_LAYERS.slice(0, i).join(", ") || "nothing else in core"}`,
  from: { path: `^packages/core/src/${layer}/` },
  to: { path: `^packages/core/src/(${CORE_LAYERS.slice(i + 1).join("|")})/` },
}));

const packageRules = Object.entries(PACKAGES).map(([name, allowed]) => {
  const others = Object.keys(PACKAGES).filter((p) => p !== name && !allowed.includes(p));
  return {
    name: `package-${name}-imports-only-its-dependencies`,
    severity: "error",
    comment: `@forkd/${name} may import only ${allowed.map((a) => `@forkd/${a}`).join(", ") || "no other forkd package"}`,
    from: { path: `^packages/${name}/src/` },
    to: { path: `^packages/(${others.join("|")})/` },
  };
});

module.exports = {
  forbidden: [
    {
      name: "no-circular",
      severity: "error",
      comment: "an import cycle: move the shared piece down a layer, or pass it in from above",
      from: {},
      to: { circular: true },
    },
    {
      name: "core-files-live-in-a-layer",
      severity: "error",
      comment: "every module of core lives in one of its layer folders (index.ts is the only file at the top)",
      from: { path: "^packages/core/src/[^/]+[.]ts$", pathNot: "^packages/core/src/index[.]ts$" },
      to: {},
    },
    ...layerRules,
    ...packageRules,
    {
      name: "sdk-takes-only-types-from-daemon",
      severity: "error",
      comment:
        "@forkd/sdk may import the daemon's API types (import type) and nothing that runs: installing the SDK must not pull in the server",
      from: { path: "^packages/sdk/src/" },
      to: { path: "^packages/daemon/", dependencyTypesNot: ["type-only"] },
    },
  ],
  options: {
    doNotFollow: { path: "node_modules" },
    exclude: { path: "(^|/)dist/|node_modules" },
    // Type-only imports count: a cycle of types is still a cycle for a reader.
    tsPreCompilationDeps: true,
    tsConfig: { fileName: "tsconfig.check.json" },
    enhancedResolveOptions: { exportsFields: ["exports"], conditionNames: ["import", "types", "default"] },
  },
};
