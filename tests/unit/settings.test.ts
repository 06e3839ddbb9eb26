// forkd's settings table (core/src/common/settings.ts): each variable parsed and
// checked in one place, a bad value an error that names it, the README generated
// from the table, and no variable read anywhere the table does not list.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  clientSocketPath,
  configureSettings,
  defaultSocketPath,
  ForkdError,
  forkdHome,
  hiddenPaths,
  isForkdError,
  SETTINGS,
  setting,
  settings,
  settingsEnv,
  settingsMarkdown,
  withSettings,
} from "@forkd/core";
import { afterEach, describe, expect, it } from "vitest";
import { CLI, REPO_ROOT } from "../helpers/env.js";

const touched = new Map<string, string | undefined>();
function setEnv(name: string, value: string | undefined): void {
  if (!touched.has(name)) touched.set(name, process.env[name]);
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
}
afterEach(() => {
  for (const [name, value] of touched) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
  touched.clear();
});

function caught(fn: () => unknown): ForkdError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ForkdError) return err;
    throw err;
  }
  throw new Error("expected an error");
}

describe("settings", () => {
  it("takes the default when a variable is unset or empty, and follows the variable when it changes", () => {
    setEnv("FORKD_HOME", undefined);
    expect(forkdHome()).toBe("/var/lib/forkd");
    setEnv("FORKD_HOME", "");
    expect(forkdHome()).toBe("/var/lib/forkd");
    setEnv("FORKD_HOME", "/tmp/forkd-a");
    expect(forkdHome()).toBe("/tmp/forkd-a");
    setEnv("FORKD_HOME", "/tmp/forkd-b/../forkd-c");
    expect(forkdHome()).toBe("/tmp/forkd-c");
    setEnv("FORKD_REGISTRY_CHUNK_MIB", "32");
    expect(setting("registryChunkMib")).toBe(32);
    setEnv("FORKD_INSECURE_REGISTRIES", " a:5000, ,B ");
    expect(setting("insecureRegistries")).toEqual(["a:5000", "B"]);
    setEnv("FORKD_FAULT", "fork.row-written@2:fail, branch.live-stopped");
    expect(setting("fault")).toBe("fork.row-written@2:fail, branch.live-stopped");
  });

  it("refuses a bad value with invalid_setting naming the variable, the value and what is allowed", () => {
    for (const [variable, value, name] of [
      ["FORKD_REGISTRY_CHUNK_MIB", "lots", "registryChunkMib"],
      ["FORKD_REGISTRY_CHUNK_MIB", "1024", "registryChunkMib"],
      ["FORKD_STAGE_BUDGET_MIB", "-1", "stageBudgetMib"],
      ["FORKD_MAX_OUTPUT_BYTES", "1.5", "maxOutputBytes"],
      ["FORKD_ADMIT_DIRTY_FRACTION", "2", "admitDirtyFraction"],
      ["FORKD_CONFINE", "maybe", "confine"],
      ["FORKD_CONFINE_HIDE", "/etc/secret:relative/path", "confineHide"],
      ["FORKD_ACCEL", "hvf", "accel"],
      ["FORKD_URL", "ftp://example.com", "url"],
      ["FORKD_KERNEL", "../../etc", "kernel"],
      ["FORKD_FAULT", "fork.started;rm", "fault"],
    ] as const) {
      setEnv(variable, value);
      const err = caught(() => setting(name));
      expect(isForkdError(err, "invalid_setting"), variable).toBe(true);
      expect(err.message).toBe(`${variable}='${value}' is not allowed: ${SETTINGS[name].allowed}`);
      expect(err.details).toMatchObject({ variable, value });
      // start-up checks every setting, so the same value stops it there
      expect(() => settings()).toThrow(variable);
      setEnv(variable, undefined);
    }
    expect(() => settings()).not.toThrow();
  });

  it("lets code decide a setting over its variable until it restores, and hands both to a child process", async () => {
    setEnv("FORKD_CONFINE_HIDE", "/srv/a");
    setEnv("FORKD_RUN_DIR", "/tmp/forkd-run");
    expect(hiddenPaths()).toContain("/srv/a");
    const restore = configureSettings({ confineHide: ["/srv/a", "/srv/token"], networkPolicy: "off" });
    try {
      expect(hiddenPaths()).toContain("/srv/token");
      expect(setting("networkPolicy")).toBe("off");
      const env = settingsEnv({ home: "/tmp/forkd-child" });
      expect(env.FORKD_CONFINE_HIDE).toBe("/srv/a:/srv/token");
      expect(env.FORKD_NETWORK_POLICY).toBe("off");
      expect(env.FORKD_HOME).toBe("/tmp/forkd-child");
      expect(env.FORKD_RUN_DIR).toBe("/tmp/forkd-run");
      expect(settingsEnv({ token: undefined })).not.toHaveProperty("FORKD_TOKEN");
    } finally {
      restore();
    }
    expect(hiddenPaths()).not.toContain("/srv/token");
    expect(setting("networkPolicy")).toBe("on");
    expect(await withSettings({ home: "/tmp/forkd-scoped" }, async () => forkdHome())).toBe("/tmp/forkd-scoped");
    expect(forkdHome()).not.toBe("/tmp/forkd-scoped");
  });

  it("spells the default socket once: $FORKD_RUN_DIR/forkd.sock, FORKD_SOCKET for clients", () => {
    setEnv("FORKD_RUN_DIR", "/tmp/forkd-run");
    setEnv("FORKD_SOCKET", undefined);
    expect(defaultSocketPath()).toBe("/tmp/forkd-run/forkd.sock");
    expect(clientSocketPath()).toBe("/tmp/forkd-run/forkd.sock");
    setEnv("FORKD_SOCKET", "/tmp/elsewhere.sock");
    expect(clientSocketPath()).toBe("/tmp/elsewhere.sock");
    expect(defaultSocketPath()).toBe("/tmp/forkd-run/forkd.sock");
  });

  it("names each variable once, with a type, what is allowed and a description", () => {
    const specs = Object.values(SETTINGS);
    expect(new Set(specs.map((s) => s.env)).size).toBe(specs.length);
    for (const spec of specs) {
      expect(spec.type && spec.allowed && spec.description, spec.env).toBeTruthy();
      expect(spec.default !== undefined || spec.shownDefault !== undefined, `${spec.env} shows its default`).toBe(true);
    }
  });

  it("lists every FORKD_ variable the host packages mention", () => {
    const listed = new Set(Object.values(SETTINGS).map((s) => s.env));
    // Names that are not host variables: a constant, a process warning's code, and
    // FORKD_PY_IMPORTS, read inside the guest by the agent. A new name is a new row in
    // SETTINGS, or (when it is no variable) one more entry here.
    const notVariables = new Set(["FORKD_VERSION", "FORKD_BACKGROUND_FAILURE", "FORKD_PY_IMPORTS"]);
    const missing = new Set<string>();
    const walk = (dir: string): void => {
      for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
        const at = path.join(dir, entry.name);
        if (entry.isDirectory()) walk(at);
        else if (entry.name.endsWith(".ts")) {
          for (const [name] of fs.readFileSync(at, "utf8").matchAll(/\bFORKD_[A-Z][A-Z_]*[A-Z]\b/g)) {
            if (!listed.has(name) && !notVariables.has(name)) missing.add(`${name} (${path.relative(REPO_ROOT, at)})`);
          }
        }
      }
    };
    for (const pkg of fs.readdirSync(path.join(REPO_ROOT, "packages"))) {
      const src = path.join(REPO_ROOT, "packages", pkg, "src");
      if (fs.existsSync(src)) walk(src);
    }
    expect([...missing]).toEqual([]);
  });

  it("no module reaches the environment around the lint rule (destructuring process, or node:process)", () => {
    // biome's noProcessEnv sees process.env and process["env"], not these.
    const around = /\{[^}]*\benv\b[^}]*\}\s*=\s*(globalThis\.)?process\b|from\s+"(node:)?process"|require\("(node:)?process"\)/;
    const found: string[] = [];
    const walk = (dir: string): void => {
      for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
        const at = path.join(dir, entry.name);
        if (entry.isDirectory()) walk(at);
        else if (entry.name.endsWith(".ts") && around.test(fs.readFileSync(at, "utf8"))) found.push(path.relative(REPO_ROOT, at));
      }
    };
    for (const pkg of fs.readdirSync(path.join(REPO_ROOT, "packages"))) {
      const src = path.join(REPO_ROOT, "packages", pkg, "src");
      if (fs.existsSync(src)) walk(src);
    }
    expect(found).toEqual([]);
  });

  it("README's configuration block is the table's (npm run docs:settings writes it)", () => {
    const readme = fs.readFileSync(path.join(REPO_ROOT, "README.md"), "utf8");
    const block = /<!-- settings:begin -->\n([\s\S]*?)\n<!-- settings:end -->/.exec(readme)?.[1];
    expect(block, "README.md has a settings block").toBeDefined();
    expect(block).toBe(settingsMarkdown());
  });

  it("a CLI command with a bad variable stops before doing anything, naming it, with exit status 2", () => {
    const res = spawnSync(process.execPath, [CLI, "ls"], {
      encoding: "utf8",
      env: { ...process.env, FORKD_AGENT_GRACE_MS: "soon" },
    });
    expect(res.status).toBe(2);
    expect(res.stderr).toContain("FORKD_AGENT_GRACE_MS='soon' is not allowed: a whole number above 0 [invalid_setting]");
  });

  it("biome's noProcessEnv refuses process.env in packages/*/src outside the table and the few readers allowed", () => {
    // The repo's biome.json over a scratch tree of probes at the paths that matter.
    const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-lint-probe-"));
    try {
      fs.copyFileSync(path.join(REPO_ROOT, "biome.json"), path.join(root, "biome.json"));
      const probes = {
        "packages/core/src/common/probe.ts": true,
        "packages/daemon/src/probe.ts": true,
        "packages/cli/src/commands/probe.ts": true,
        "packages/core/src/common/settings.ts": false,
        "packages/agent/src/main.ts": false,
        "packages/sdk/src/environment.ts": false,
        "tests/unit/probe.test.ts": false,
      };
      for (const file of Object.keys(probes)) {
        fs.mkdirSync(path.dirname(path.join(root, file)), { recursive: true });
        fs.writeFileSync(path.join(root, file), "export const home = process.env.FORKD_HOME;\n");
      }
      const res = spawnSync(path.join(REPO_ROOT, "node_modules/.bin/biome"), ["lint", "--reporter=json", "."], {
        cwd: root,
        encoding: "utf8",
      });
      const report = JSON.parse(res.stdout) as { diagnostics: { category: string; location: { path: string } }[] };
      const flagged = report.diagnostics.filter((d) => d.category === "lint/style/noProcessEnv").map((d) => d.location.path);
      for (const [file, refused] of Object.entries(probes)) expect(flagged.includes(file), file).toBe(refused);
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});
