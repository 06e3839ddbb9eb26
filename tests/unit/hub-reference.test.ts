// The pure half of push/pull: which of the three forms a pull argument is, registry
// references, the http rule, WWW-Authenticate challenges, docker's config.json
// credentials, and hub index shapes.
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import {
  checkRedirect,
  ForkdError,
  fetchFollowing,
  parseChallenges,
  parsePullSource,
  parseRegistryRef,
  registryCredentials,
  unreachable,
  validateHubIndex,
  validateOciManifest,
} from "@forkd/core";
import { afterEach, describe, expect, it } from "vitest";

function refusal(fn: () => unknown): ForkdError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ForkdError) return err;
    throw err;
  }
  throw new Error("accepted");
}

describe("pull arguments", () => {
  it("tells the three forms apart", () => {
    expect(parsePullSource("localhost:5000/team/app:v1")).toMatchObject({
      kind: "registry",
      host: "localhost:5000",
      repository: "team/app",
      tag: "v1",
      scheme: "http",
    });
    expect(parsePullSource("ghcr.io/acme/snap@sha256:" + "a".repeat(64))).toMatchObject({
      kind: "registry",
      host: "ghcr.io",
      repository: "acme/snap",
      digest: `sha256:${"a".repeat(64)}`,
      reference: `sha256:${"a".repeat(64)}`,
      scheme: "https",
    });
    expect(parsePullSource("acme/python-warm")).toEqual({ kind: "hub", name: "acme/python-warm" });
    const url = parsePullSource("https://example.org/x.forkd.tar.zst");
    expect(url.kind).toBe("url");
  });

  it("refuses what is none of them, naming all three forms", () => {
    for (const bad of ["justaname", "a/b/c", "Acme/Name", "a/b:tag", "", "ftp://example.org/x", "owner/na me"]) {
      const err = refusal(() => parsePullSource(bad));
      expect(err.code).toBe("bad_request");
    }
    expect(refusal(() => parsePullSource("a/b/c")).message).toMatch(/HOST\[:PORT\]\/REPO.*OWNER\/NAME.*https:\/\//);
  });

  it("defaults the tag to latest and maps Docker Hub", () => {
    expect(parseRegistryRef("registry.example.com/x")).toMatchObject({ tag: "latest", reference: "latest", scheme: "https" });
    expect(parseRegistryRef("docker.io/ubuntu:24.04")).toMatchObject({
      apiHost: "registry-1.docker.io",
      repository: "library/ubuntu",
      host: "docker.io",
    });
  });

  it("refuses bad hosts, repositories, tags and digests", () => {
    expect(refusal(() => parseRegistryRef("localhost:99999/a")).message).toMatch(/host/);
    expect(refusal(() => parseRegistryRef("localhost:5000/Upper/case")).message).toMatch(/repository/);
    expect(refusal(() => parseRegistryRef("localhost:5000/a/../b")).message).toMatch(/repository/);
    expect(refusal(() => parseRegistryRef("localhost:5000/a:-bad")).message).toMatch(/tag/);
    expect(refusal(() => parseRegistryRef("localhost:5000/a@sha256:abc")).message).toMatch(/digest/);
    expect(refusal(() => parseRegistryRef("team/app:v1")).message).toMatch(/registry host/);
  });

  it("uses http only for loopback and hosts the user named", () => {
    expect(parseRegistryRef("127.0.0.1:5000/a").scheme).toBe("http");
    expect(parseRegistryRef("[::1]:5000/a").scheme).toBe("http");
    expect(parseRegistryRef("reg.lan:5000/a").scheme).toBe("https");
    expect(parseRegistryRef("reg.lan:5000/a", { insecureRegistries: ["reg.lan:5000"] }).scheme).toBe("http");
    expect(parseRegistryRef("reg.lan:5000/a", { insecureRegistries: ["reg.lan"] }).scheme).toBe("http");
    expect(refusal(() => parsePullSource("http://example.org/x.forkd.tar.zst")).message).toMatch(/plain http/);
    expect(refusal(() => parsePullSource("https://user:pw@example.org/x")).message).toMatch(/credentials/);
    expect(parsePullSource("http://127.0.0.1:8080/x.forkd.tar.zst").kind).toBe("url");
  });
});

describe("WWW-Authenticate", () => {
  it("reads Bearer challenges as Docker Hub and GHCR send them", () => {
    expect(
      parseChallenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull"'),
    ).toEqual([
      {
        scheme: "bearer",
        params: { realm: "https://auth.docker.io/token", service: "registry.docker.io", scope: "repository:library/ubuntu:pull" },
      },
    ]);
  });

  it("reads several challenges, quoted commas and escapes", () => {
    expect(parseChallenges('Basic realm="a, \\"b\\"", Bearer realm="https://t/x",scope="repository:a:pull,push"')).toEqual([
      { scheme: "basic", params: { realm: 'a, "b"' } },
      { scheme: "bearer", params: { realm: "https://t/x", scope: "repository:a:pull,push" } },
    ]);
    expect(parseChallenges(null)).toEqual([]);
  });
});

describe("credentials", () => {
  const saved = { ...process.env };
  afterEach(() => {
    process.env = { ...saved };
  });

  it("reads docker's config.json auths by host, and the environment first", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-docker-config-"));
    fs.writeFileSync(
      path.join(dir, "config.json"),
      JSON.stringify({
        auths: {
          "reg.example.com:5000": { auth: Buffer.from("alice:s3cr:et").toString("base64") },
          "https://index.docker.io/v1/": { auth: Buffer.from("bob:pw").toString("base64") },
        },
      }),
    );
    process.env.DOCKER_CONFIG = dir;
    delete process.env.FORKD_REGISTRY_USERNAME;
    delete process.env.FORKD_REGISTRY_PASSWORD;
    expect(registryCredentials("reg.example.com:5000")).toMatchObject({ username: "alice", password: "s3cr:et" });
    expect(registryCredentials("docker.io")).toMatchObject({ username: "bob", password: "pw" });
    expect(registryCredentials("other.example.com")).toBeUndefined();
    process.env.FORKD_REGISTRY_USERNAME = "env-user";
    process.env.FORKD_REGISTRY_PASSWORD = "env-pass";
    expect(registryCredentials("reg.example.com:5000")).toMatchObject({ username: "env-user", password: "env-pass" });
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe("connection failures", () => {
  it("says which host and what happened, in words", () => {
    const url = new URL("https://registry.example.com/v2/");
    const dns = Object.assign(new TypeError("fetch failed"), {
      cause: Object.assign(new Error("getaddrinfo ENOTFOUND"), { code: "ENOTFOUND" }),
    });
    expect(unreachable(dns, url).message).toBe(
      "cannot reach https://registry.example.com/v2/: unknown host 'registry.example.com': the name does not resolve",
    );
    expect(unreachable(dns, url).code).toBe("registry_unreachable");
    const tls = Object.assign(new TypeError("fetch failed"), {
      cause: Object.assign(new Error("wrong version number"), { code: "EPROTO" }),
    });
    expect(unreachable(tls, url).message).toMatch(/TLS failed.*--insecure-registry registry\.example\.com/);
  });
});

describe("documents from the network", () => {
  it("checks hub index shapes", () => {
    const ok = validateHubIndex({ snapshots: { "acme/py": { url: "py.forkd.tar.zst", sha256: "b".repeat(64) } } }, "x");
    expect(ok.snapshots["acme/py"]?.url).toBe("py.forkd.tar.zst");
    expect(refusal(() => validateHubIndex({}, "x")).message).toMatch(/snapshots/);
    expect(refusal(() => validateHubIndex({ snapshots: { "../x": { url: "u" } } }, "x")).message).toMatch(/OWNER\/NAME/);
    expect(refusal(() => validateHubIndex({ snapshots: { "a/b": { url: "u", sha256: "XYZ" } } }, "x")).message).toMatch(/sha256/);
  });

  it("refuses manifests that are not forkd snapshots", () => {
    const ref = parseRegistryRef("localhost:5000/a:b");
    const layer = {
      mediaType: "application/vnd.forkd.pack.member.v1+zstd",
      digest: `sha256:${"c".repeat(64)}`,
      size: 10,
      annotations: { "org.opencontainers.image.title": "snapshots/a/manifest.json" },
    };
    const config = { mediaType: "application/vnd.forkd.pack.index.v1+json", digest: `sha256:${"d".repeat(64)}`, size: 10 };
    expect(validateOciManifest(ref, { schemaVersion: 2, config, layers: [layer] }).layers).toHaveLength(1);
    expect(
      refusal(() =>
        validateOciManifest(ref, {
          schemaVersion: 2,
          config: { ...config, mediaType: "application/vnd.oci.image.config.v1+json" },
          layers: [layer],
        }),
      ).message,
    ).toMatch(/not a forkd snapshot.*ordinary container image/);
    expect(refusal(() => validateOciManifest(ref, { schemaVersion: 2, config, layers: [{ ...layer, digest: "md5:x" }] })).message).toMatch(
      /digest/,
    );
    expect(refusal(() => validateOciManifest(ref, { schemaVersion: 2, config, layers: [{ ...layer, annotations: {} }] })).message).toMatch(
      /title/,
    );
    // Sizes and counts are bounded before anything is fetched.
    expect(refusal(() => validateOciManifest(ref, { schemaVersion: 2, config, layers: [{ ...layer, size: -1 }] })).message).toMatch(
      /declares -1/,
    );
    expect(
      refusal(() => validateOciManifest(ref, { schemaVersion: 2, config: { ...config, size: 2 ** 30 }, layers: [layer] })).message,
    ).toMatch(/index is \d+ bytes/);
    expect(refusal(() => validateOciManifest(ref, { schemaVersion: 2, config, layers: Array(4097).fill(layer) })).message).toMatch(
      /4097 layers \(at most 4096\)/,
    );
  });
});

describe("where a registry may redirect a download", () => {
  // A public registry's name, resolved by the test: no DNS, nothing leaves this machine.
  const names: Record<string, string[]> = {
    "registry.example": ["203.0.113.10"],
    "cdn.example": ["198.51.100.7", "2001:db8::7"],
    "sneaky.example": ["198.51.100.8", "10.1.2.3"],
    "in-house.example": ["10.0.0.2"],
  };
  const resolve = async (host: string) => names[host] ?? [host.replace(/^\[|\]$/g, "")];
  const at = (u: string) => new URL(u);

  it("lets a public registry send forkd to another public host", async () => {
    await expect(
      checkRedirect(at("https://registry.example/v2/"), at("https://cdn.example/blob"), "pull", resolve),
    ).resolves.toBeUndefined();
  });

  it("refuses loopback, link-local (cloud metadata), private, ULA and names resolving to any of them", async () => {
    for (const target of [
      "http://127.0.0.1:5000/x",
      "http://169.254.169.254/latest/meta-data/",
      "http://192.168.1.1/",
      "http://[::1]:8080/",
      "http://[fd00::1]/",
      "http://[::ffff:127.0.0.1]/",
      "https://sneaky.example/blob",
    ]) {
      const err = await checkRedirect(at("https://registry.example/v2/"), at(target), "pull", resolve).catch((e: unknown) => e);
      expect(err, target).toBeInstanceOf(ForkdError);
      expect((err as ForkdError).message, target).toMatch(/redirected to .*loopback, private or link-local address; refused/);
    }
  });

  it("lets a registry that is itself local or in-house redirect anywhere", async () => {
    await expect(checkRedirect(at("http://127.0.0.1:5000/v2/"), at("http://127.0.0.1:5001/b"), "pull", resolve)).resolves.toBeUndefined();
    await expect(checkRedirect(at("https://in-house.example/v2/"), at("http://10.9.9.9/b"), "pull", resolve)).resolves.toBeUndefined();
  });

  it("checks every hop of a real download (local servers): a loopback source may redirect to loopback, a public one may not", async () => {
    const target = http.createServer((_req, res) => res.end("the blob"));
    const source = http.createServer((_req, res) => {
      res.writeHead(302, { location: `http://127.0.0.1:${(target.address() as AddressInfo).port}/blob` });
      res.end();
    });
    await new Promise<void>((r) => target.listen(0, "127.0.0.1", r));
    await new Promise<void>((r) => source.listen(0, "127.0.0.1", r));
    try {
      const port = (source.address() as AddressInfo).port;
      const res = await fetchFollowing(at(`http://127.0.0.1:${port}/start`), { what: "read the hub index" });
      expect(await res.text()).toBe("the blob");
      // The same start, as if its name were a public registry's (the origin is resolved
      // first, every hop after it as it is): its redirect into loopback is refused.
      let calls = 0;
      const originLooksPublic = async (host: string) => (calls++ === 0 ? ["203.0.113.10"] : [host]);
      const err = await fetchFollowing(at(`http://127.0.0.1:${port}/start`), {
        what: "read the hub index",
        resolve: originLooksPublic,
      }).catch((e: unknown) => e);
      expect((err as Error).message).toMatch(/redirected to 127\.0\.0\.1:\d+, a loopback, private or link-local address; refused/);
    } finally {
      source.close();
      target.close();
    }
  });
});
