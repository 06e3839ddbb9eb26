// The three deployments in deploy/ checked offline, no cluster needed:
// - Kubernetes: every document validates against the Kubernetes API schema of its
//   kind (kubernetes-models' validators, generated from the API's OpenAPI document),
//   and the pieces fit together (selectors, volumes, config keys, quorum budget);
// - Nomad: the job parses with HashiCorp's own HCL parser (@cdktf/hcl2json, the Go
//   parser built to WebAssembly) and is a system job whose variables are declared;
// - systemd: `systemd-analyze verify` accepts the unit.
// In all three, the forkd command line is checked against the CLI's real option table,
// so a renamed or removed flag fails here rather than on an operator's fleet.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parse as parseHcl } from "@cdktf/hcl2json";
import { COMMAND_MODULES } from "@forkd/cli/commands";
import { Command } from "commander";
import { DaemonSet } from "kubernetes-models/apps/v1/DaemonSet";
import { StatefulSet } from "kubernetes-models/apps/v1/StatefulSet";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1/PodDisruptionBudget";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { Namespace } from "kubernetes-models/v1/Namespace";
import { Service } from "kubernetes-models/v1/Service";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { REPO_ROOT } from "../helpers/env.js";

const DEPLOY = path.join(REPO_ROOT, "deploy");

type Manifest = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
} & Record<
  string,
  // biome-ignore lint/suspicious/noExplicitAny: manifests are checked against the schema below, then read by shape
  any
>;

/** The Kubernetes model of each kind the manifests use: its constructor's validate() applies the API schema. */
const MODELS: Record<string, new (data: never) => { validate(): void }> = {
  "v1/Namespace": Namespace,
  "v1/ConfigMap": ConfigMap,
  "v1/Service": Service,
  "apps/v1/DaemonSet": DaemonSet,
  "apps/v1/StatefulSet": StatefulSet,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
};

function validateManifest(doc: Manifest): void {
  const Model = MODELS[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) throw new Error(`no schema for ${doc.apiVersion} ${doc.kind}`);
  new Model(structuredClone(doc) as never).validate();
}

function loadKubernetes(): Manifest[] {
  const dir = path.join(DEPLOY, "kubernetes");
  const docs: Manifest[] = [];
  for (const file of fs
    .readdirSync(dir)
    .filter((f) => f.endsWith(".yaml"))
    .sort()) {
    for (const doc of parseAllDocuments(fs.readFileSync(path.join(dir, file), "utf8"))) {
      if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0]!.message}`);
      const value = doc.toJS() as Manifest | null;
      if (value) docs.push(value);
    }
  }
  return docs;
}

/** One program per CLI module, built once: loading a module registers its commands. */
const programs = new Map<string, Promise<Command>>();

/** Long options of a forkd command (path of names from the top), and the global ones. */
async function cliOptions(names: string[]): Promise<{ command: Set<string>; global: Set<string> }> {
  const module = COMMAND_MODULES.find((m) => m.commands.includes(names[0]!));
  if (!module) throw new Error(`no CLI module registers '${names[0]}'`);
  let built = programs.get(names[0]!);
  if (!built) {
    built = module.load().then((register) => {
      const p = new Command();
      p.option("--daemon-url <url>").option("--daemon-token <token>");
      register(p);
      return p;
    });
    programs.set(names[0]!, built);
  }
  const program = await built;
  let cmd: Command = program;
  for (const name of names) {
    const next = cmd.commands.find((c) => c.name() === name);
    if (!next) throw new Error(`forkd ${names.join(" ")}: no '${name}' command`);
    cmd = next;
  }
  const longs = (c: Command) => new Set(c.options.map((o) => o.long).filter((l): l is string => typeof l === "string"));
  return { command: longs(cmd), global: longs(program) };
}

/** Every --flag of a forkd command line (`--x=v` or `--x v`) is one the CLI defines. */
async function expectKnownFlags(argv: string[]): Promise<void> {
  const globals = ["--daemon-url", "--daemon-token"];
  const args = [...argv];
  const flagsBefore: string[] = [];
  while (args[0]?.startsWith("--")) {
    const flag = args.shift()!;
    flagsBefore.push(flag.split("=")[0]!);
    if (!flag.includes("=")) args.shift(); // its value
  }
  const names: string[] = [];
  while (args[0] && !args[0].startsWith("-") && names.length < 2) {
    const candidate = [...names, args[0]];
    const ok = await cliOptions(candidate).then(
      () => true,
      () => false,
    );
    if (!ok) break;
    names.push(args.shift()!);
  }
  expect(names.length, `no forkd command in ${argv.join(" ")}`).toBeGreaterThan(0);
  const { command } = await cliOptions(names);
  for (const flag of flagsBefore) expect(globals, `${flag} is not a global forkd option`).toContain(flag);
  for (const arg of args.filter((a) => a.startsWith("--"))) {
    const flag = arg.split("=")[0]!;
    expect([...command], `forkd ${names.join(" ")} has no ${flag}`).toContain(flag);
  }
}

function matches(selector: Record<string, string>, labels: Record<string, string> | undefined): boolean {
  return Object.entries(selector).every(([k, v]) => labels?.[k] === v);
}

describe("deploy/kubernetes", () => {
  const docs = loadKubernetes();
  const one = (kind: string, name?: string) => {
    const found = docs.filter((d) => d.kind === kind && (name === undefined || d.metadata.name === name));
    expect(found, `${kind} ${name ?? ""}`).toHaveLength(1);
    return found[0]!;
  };

  it("every document validates against the Kubernetes API schema of its kind", () => {
    expect(docs.length).toBeGreaterThanOrEqual(7);
    for (const doc of docs) expect(() => validateManifest(doc), `${doc.kind} ${doc.metadata?.name}`).not.toThrow();
  });

  it("the schema check catches a wrong manifest", () => {
    const ds = structuredClone(one("DaemonSet"));
    ds.spec.template.spec.containers[0].securityContext.privileged = "yes";
    expect(() => validateManifest(ds)).toThrow(/privileged must be boolean/);
    const sts = structuredClone(one("StatefulSet"));
    delete sts.spec.selector;
    expect(() => validateManifest(sts)).toThrow(/selector/);
  });

  it("everything is in the forkd namespace", () => {
    for (const doc of docs.filter((d) => d.kind !== "Namespace")) expect(doc.metadata.namespace, doc.metadata.name).toBe("forkd");
  });

  it("the daemon gets what it needs from the host", () => {
    const ds = one("DaemonSet", "forkd");
    const pod = ds.spec.template.spec;
    expect(matches(ds.spec.selector.matchLabels, ds.spec.template.metadata.labels)).toBe(true);
    expect(pod.hostNetwork).toBe(true);
    const [container] = pod.containers;
    // Privileged: QEMU under per-sandbox uids, cgroups, netns, nftables; the host's /dev (and /dev/kvm where present).
    expect(container.securityContext.privileged).toBe(true);
    const volumes = new Map<string, Manifest>(pod.volumes.map((v: Manifest) => [v.name, v]));
    const mounts = new Map<string, Manifest>(container.volumeMounts.map((m: Manifest) => [m.mountPath, m]));
    for (const m of container.volumeMounts) expect(volumes.has(m.name), `mount ${m.name} has a volume`).toBe(true);
    const hostPathAt = (mountPath: string) => volumes.get(mounts.get(mountPath)?.name)?.hostPath?.path;
    expect(hostPathAt("/dev/shm/forkd")).toBe("/dev/shm/forkd");
    expect(hostPathAt("/sys/fs/cgroup")).toBe("/sys/fs/cgroup");
    expect(hostPathAt("/run/netns")).toBe("/run/netns");
    expect(mounts.get("/run/netns")?.mountPropagation).toBe("Bidirectional");
    expect(hostPathAt("/var/lib/forkd")).toBe("/var/lib/forkd");
    const env = new Map<string, Manifest>(container.env.map((e: Manifest) => [e.name, e]));
    expect(env.get("FORKD_SHM_DIR")?.value).toBe("/dev/shm/forkd");
    const config = one("ConfigMap", "forkd-cluster");
    for (const e of container.env) {
      const ref = e.valueFrom?.configMapKeyRef;
      if (ref) expect(config.data[ref.key], `config key ${ref.key}`).toBeDefined();
    }
    expect(container.readinessProbe.httpGet.path).toBe("/healthz");
  });

  it("the daemon's command line is real forkd options", async () => {
    const [container] = one("DaemonSet", "forkd").spec.template.spec.containers;
    expect(container.command[0]).toBe("forkd");
    await expectKnownFlags(container.command.slice(1));
    // Every $(VAR) the command line expands is set in the container's env (Kubernetes leaves an unknown one as text).
    const env = new Set(container.env.map((e: Manifest) => e.name));
    for (const m of (container.command as string[]).join(" ").matchAll(/\$\(([A-Z_]+)\)/g)) expect(env, `$(${m[1]})`).toContain(m[1]);
    await expect(expectKnownFlags(["daemon", "--no-such-flag=1"])).rejects.toThrow(/no --no-such-flag/);
  });

  it("etcd has an odd number of members, one per host, and a budget that keeps the quorum", () => {
    const sts = one("StatefulSet", "forkd-etcd");
    const replicas: number = sts.spec.replicas;
    expect(replicas % 2).toBe(1);
    expect(replicas).toBeGreaterThanOrEqual(3);
    const members = (sts.spec.template.spec.containers[0].command as string[]).find((a) => a.startsWith("--initial-cluster="))!;
    expect(members.split(",")).toHaveLength(replicas);
    expect(sts.spec.template.spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey).toBe(
      "kubernetes.io/hostname",
    );
    const pdb = one("PodDisruptionBudget", "forkd-etcd");
    expect(matches(pdb.spec.selector.matchLabels, sts.spec.template.metadata.labels)).toBe(true);
    expect(pdb.spec.minAvailable).toBe(Math.floor(replicas / 2) + 1);
    const headless = one("Service", "forkd-etcd");
    expect(headless.spec.clusterIP).toBe("None");
    expect(sts.spec.serviceName).toBe(headless.metadata.name);
    // The daemons' endpoints name the StatefulSet's members through the headless Service.
    const endpoints = one("ConfigMap", "forkd-cluster").data.cluster as string;
    for (let i = 0; i < replicas; i++) expect(endpoints).toContain(`forkd-etcd-${i}.forkd-etcd.forkd.svc:2379`);
  });

  it("the API Service reaches the daemons", () => {
    const svc = one("Service", "forkd");
    const ds = one("DaemonSet", "forkd");
    expect(matches(svc.spec.selector, ds.spec.template.metadata.labels)).toBe(true);
    const port = ds.spec.template.spec.containers[0].ports.find((p: Manifest) => p.name === svc.spec.ports[0].targetPort);
    expect(port?.containerPort).toBe(7070);
  });
});

describe("deploy/nomad", () => {
  const file = path.join(DEPLOY, "nomad", "forkd.nomad.hcl");
  const text = fs.readFileSync(file, "utf8");

  it("parses with HashiCorp's HCL parser, and a broken file does not", async () => {
    await expect(parseHcl("forkd.nomad.hcl", text)).resolves.toBeDefined();
    await expect(parseHcl("broken.hcl", text.replace('type        = "system"', 'type = "system" }'))).rejects.toThrow();
  });

  it("is a system job running the daemon with declared variables and real forkd options", async () => {
    // biome-ignore lint/suspicious/noExplicitAny: hcl2json's output, read by shape
    const parsed = (await parseHcl("forkd.nomad.hcl", text)) as any;
    const [job] = parsed.job.forkd;
    expect(job.type).toBe("system");
    const [group] = job.group.forkd;
    const [task] = group.task.daemon;
    expect(task.driver).toBe("raw_exec");
    const [config] = task.config;
    // biome-ignore lint/suspicious/noTemplateCurlyInString: HCL's interpolation, as the parser returns it
    expect(config.command).toBe("${var.forkd_bin}");
    const declared = new Set(Object.keys(parsed.variable));
    for (const m of text.matchAll(/\bvar\.([a-z_]+)/g)) expect(declared, `variable ${m[1]}`).toContain(m[1]);
    const args = (config.args as string[]).map((a) => a.replace(/\$\{[^}]+\}/g, "X"));
    await expectKnownFlags(args);
    expect(group.network[0].port.api[0].static).toBe(7070);
    expect(group.service[0].check[0].path).toBe("/healthz");
  });
});

describe("deploy/systemd", () => {
  const unit = fs.readFileSync(path.join(DEPLOY, "systemd", "forkd.service"), "utf8");

  it("systemd-analyze verify accepts the unit", () => {
    // verify wants the binary to exist: point it at one that does (the unit is otherwise as shipped).
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-unit-"));
    try {
      const copy = path.join(dir, "forkd.service");
      fs.writeFileSync(copy, unit.replaceAll("/usr/local/bin/forkd", process.execPath));
      const res = spawnSync("systemd-analyze", ["verify", "--man=no", copy], { encoding: "utf8" });
      expect(res.error).toBeUndefined();
      expect(res.stderr.trim()).toBe("");
      expect(res.status).toBe(0);
      fs.writeFileSync(copy, unit.replace("[Service]", "[Service]\nNoSuchKey=1").replaceAll("/usr/local/bin/forkd", process.execPath));
      const bad = spawnSync("systemd-analyze", ["verify", "--man=no", copy], { encoding: "utf8" });
      expect(bad.stderr).toMatch(/NoSuchKey/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("runs the daemon with real forkd options; the env file sets what the unit reads", async () => {
    const env = fs.readFileSync(path.join(DEPLOY, "systemd", "cluster.env.example"), "utf8");
    const set = new Set([...env.matchAll(/^([A-Z_]+)=/gm)].map((m) => m[1]));
    for (const line of unit.split("\n").filter((l) => /^Exec(Start|Stop)=/.test(l))) {
      for (const m of line.matchAll(/\$\{([A-Z_]+)\}/g)) expect(set, `${m[1]} in cluster.env.example`).toContain(m[1]);
      const argv = line
        .replace(/^Exec\w+=/, "")
        .replace(/\$\{[A-Z_]+\}/g, "X")
        .split(/\s+/);
      expect(argv[0]).toBe("/usr/local/bin/forkd");
      await expectKnownFlags(argv.slice(1));
    }
  });
});
