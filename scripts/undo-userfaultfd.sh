#!/usr/bin/env bash
# Undo what earlier versions of scripts/setup.sh changed on the host for live BRANCH:
# they set vm.unprivileged_userfaultfd=1 (every local user could then use
# userfaultfd, a favourite tool for widening kernel race windows) and persisted it
# in /etc/sysctl.d/60-forkd.conf. Live capture copies the pages a guest wrote
# instead, and needs no userfaultfd. Only our own change is undone: the file, with
# exactly the content we wrote, says it was us; without it the setting is the
# operator's and stays as it is.
#
# SYSCTL_D and PROC_SYS point elsewhere in tests (defaults: the host's).
set -euo pipefail

sysctl_d="${SYSCTL_D:-/etc/sysctl.d}"
proc_sys="${PROC_SYS:-/proc/sys}"
ours="$sysctl_d/60-forkd.conf"
what_we_wrote=$'# forkd: live BRANCH of VMMs that run as unprivileged uids\nvm.unprivileged_userfaultfd = 1'

[ -f "$ours" ] || exit 0
if [ "$(cat "$ours")" != "$what_we_wrote" ]; then
  printf '[setup] %s is not as forkd wrote it; leaving it and vm.unprivileged_userfaultfd alone\n' "$ours" >&2
  exit 0
fi
printf '[setup] removing %s and returning vm.unprivileged_userfaultfd to 0 (set by an earlier forkd setup; live BRANCH no longer needs it)\n' "$ours" >&2
rm -f -- "$ours"
if [ -w "$proc_sys/vm/unprivileged_userfaultfd" ]; then
  printf '0\n' >"$proc_sys/vm/unprivileged_userfaultfd"
fi
