#!/usr/bin/env bash
# Undo the host-wide sysctls earlier versions of scripts/setup.sh turned on and
# persisted in /etc/sysctl.d:
# - vm.unprivileged_userfaultfd=1 (60-forkd.conf), for live BRANCH of unprivileged
#   VMMs: every local user could then use userfaultfd, a favourite tool for widening
#   kernel race windows. Live capture copies the pages a guest wrote instead.
# - net.ipv4.ip_forward=1 (61-forkd-net.conf): the host then routed for every
#   interface. forkd now turns forwarding on per interface, only where its egress
#   namespace's traffic passes (core/src/net/netns.ts).
# Only our own change is undone: the file, with exactly the content we wrote, says
# it was us; without it the setting is the operator's and stays as it is. Another
# sysctl file that asks for the same setting also keeps the running value.
#
# SYSCTL_D, SYSCTL_CONF, SYSCTL_OTHER_DIRS and PROC_SYS point elsewhere in tests
# (defaults: the host's).
set -euo pipefail

sysctl_d="${SYSCTL_D:-/etc/sysctl.d}"
sysctl_conf="${SYSCTL_CONF:-/etc/sysctl.conf}"
proc_sys="${PROC_SYS:-/proc/sys}"
read -r -a other_dirs <<<"${SYSCTL_OTHER_DIRS:-/run/sysctl.d /usr/lib/sysctl.d}"

# undo_ours FILE WHAT_WE_WROTE KEY WHY: KEY is dotted (vm.unprivileged_userfaultfd).
undo_ours() {
  local ours="$sysctl_d/$1" what_we_wrote="$2" key="$3" why="$4"
  [ -f "$ours" ] || return 0
  if [ "$(cat "$ours")" != "$what_we_wrote" ]; then
    printf '[setup] %s is not as forkd wrote it; leaving it and %s alone\n' "$ours" "$key" >&2
    return 0
  fi
  rm -f -- "$ours"
  local candidates=("$sysctl_conf" "$sysctl_d"/*.conf) dir others
  for dir in "${other_dirs[@]}"; do candidates+=("$dir"/*.conf); done
  local pattern="^[[:space:]]*${key//./[./]}[[:space:]]*=[[:space:]]*1"
  others=$(grep -lsE "$pattern" "${candidates[@]}" || true)
  if [ -n "$others" ]; then
    printf '[setup] removed %s; %s stays as it is: %s asks for it too\n' "$ours" "$key" "${others//$'\n'/ }" >&2
    return 0
  fi
  printf '[setup] removed %s and returned %s to 0 (set by an earlier forkd setup; %s)\n' "$ours" "$key" "$why" >&2
  local proc_file="$proc_sys/${key//.//}"
  if [ -w "$proc_file" ]; then
    printf '0\n' >"$proc_file"
  fi
}

undo_ours 60-forkd.conf $'# forkd: live BRANCH of VMMs that run as unprivileged uids\nvm.unprivileged_userfaultfd = 1' \
  vm.unprivileged_userfaultfd "live BRANCH no longer needs it"
undo_ours 61-forkd-net.conf $'# forkd: route the sandboxes\' egress namespace out (see the README security model)\nnet.ipv4.ip_forward = 1' \
  net.ipv4.ip_forward "forkd now forwards only on its own namespace's links"
