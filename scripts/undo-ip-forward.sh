#!/usr/bin/env bash
# Undo what earlier versions of scripts/setup.sh changed on the host for the
# sandboxes' network: they set net.ipv4.ip_forward=1 (the host then routed for
# every interface, not only for forkd's egress namespace) and persisted it in
# /etc/sysctl.d/61-forkd-net.conf. forkd now turns forwarding on per interface,
# only where the namespace's traffic passes (core/src/net/netns.ts). Only our own
# change is undone: the file, with exactly the content we wrote, says it was us;
# without it the setting is the operator's and stays as it is. Another sysctl file
# that asks for forwarding too also keeps the running value as it is.
#
# SYSCTL_D, SYSCTL_CONF, SYSCTL_OTHER_DIRS and PROC_SYS point elsewhere in tests
# (defaults: the host's).
set -euo pipefail

sysctl_d="${SYSCTL_D:-/etc/sysctl.d}"
sysctl_conf="${SYSCTL_CONF:-/etc/sysctl.conf}"
proc_sys="${PROC_SYS:-/proc/sys}"
read -r -a other_dirs <<<"${SYSCTL_OTHER_DIRS:-/run/sysctl.d /usr/lib/sysctl.d}"
ours="$sysctl_d/61-forkd-net.conf"
what_we_wrote=$'# forkd: route the sandboxes\' egress namespace out (see the README security model)\nnet.ipv4.ip_forward = 1'

[ -f "$ours" ] || exit 0
if [ "$(cat "$ours")" != "$what_we_wrote" ]; then
  printf '[setup] %s is not as forkd wrote it; leaving it and net.ipv4.ip_forward alone\n' "$ours" >&2
  exit 0
fi
rm -f -- "$ours"
candidates=("$sysctl_conf" "$sysctl_d"/*.conf)
for dir in "${other_dirs[@]}"; do candidates+=("$dir"/*.conf); done
others=$(grep -lsE '^[[:space:]]*net[./]ipv4[./]ip_forward[[:space:]]*=[[:space:]]*1' "${candidates[@]}" || true)
if [ -n "$others" ]; then
  printf '[setup] removed %s; net.ipv4.ip_forward stays as it is: %s asks for it too\n' "$ours" "${others//$'\n'/ }" >&2
  exit 0
fi
printf '[setup] removed %s and returned net.ipv4.ip_forward to 0 (set by an earlier forkd setup; forkd now forwards only on its own namespace'"'"'s links)\n' "$ours" >&2
if [ -w "$proc_sys/net/ipv4/ip_forward" ]; then
  printf '0\n' >"$proc_sys/net/ipv4/ip_forward"
fi
