#!/usr/bin/env bash
# Installs whatever forkd needs on a Debian 12 host, builds it, and builds the
# base guest image. Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# cppcheck, shellcheck, python3-mypy, pyflakes3: npm run lint. chromium: the dashboard's browser tests (tests/browser, driven by playwright-core). docker-registry: the hub tests and `forkd bench pack` start their own instance on loopback (never the packaged service).
# etcd-server, etcd-client: the cluster tests start their own etcd on loopback (never the packaged service).
APT_PACKAGES=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static e2fsprogs zstd gcc g++ make python3 libc6-dev binutils util-linux debootstrap nftables iproute2 docker-registry python3-pytest cppcheck shellcheck python3-mypy pyflakes3 etcd-server etcd-client chromium)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "this is not a Debian-family system; install these by hand (names are Debian's): ${missing[*]}"
    say "forkd needs QEMU (qemu-system-x86_64), a Linux kernel with virtio modules, a static busybox, mkfs.ext4, gcc with static libc, and Node.js 20."
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: ${missing[*]}"
    say "run as root, or install them first: sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  say "Node.js 20 or newer is needed (found $(node --version))"
  exit 1
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "npm ci"
  npm ci --no-audit --no-fund
fi

say "building"
npm run --silent build

if [ "$(id -u)" -ne 0 ] && [ -z "${FORKD_HOME:-}" ]; then
  say "not root: set FORKD_HOME and FORKD_RUN_DIR to writable directories, or run as root"
  exit 1
fi
# Setup changes no host-wide sysctl. Live BRANCH copies the pages a guest wrote
# (no userfaultfd), and forkd turns forwarding on per interface, only where the
# egress namespace's traffic passes, when it makes the namespace. Undo the
# vm.unprivileged_userfaultfd=1 and net.ipv4.ip_forward=1 an earlier setup of
# ours set (only where the file it wrote says it was ours).
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/undo-host-sysctls.sh
fi

node packages/cli/dist/main.js image build --name base
# E2B's `base` template (tests/e2b, `forkd bench e2b`) starts from this Debian image (core's
# `debian` recipe: bash, coreutils, python3, sudo, git, user `user`); built here, cached by its
# input digest, so no test pays the debootstrap. The daemon makes the warm snapshot on first use.
node packages/cli/dist/main.js image build --name debian
