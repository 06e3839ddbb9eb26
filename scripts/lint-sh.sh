#!/usr/bin/env bash
# Shellchecks every shell script in the repository (found by name or by its #!
# line, so a new one is covered without being listed here) and the scripts forkd
# generates for its guests (written out from the built packages/core). The guest
# scripts run under busybox ash, which shellcheck does not know: they are checked
# as dash, the closest dialect it has.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t scripts < <(
  find . \( -name node_modules -o -name dist -o -name .git \) -prune -o -type f -size -1000k \
    -exec awk 'FNR == 1 { if (FILENAME ~ /\.sh$/ || $0 ~ /^#!.*[\/ ](ba|da|a)?sh( |$)/) print FILENAME; nextfile }' {} + | sort
)
shellcheck --norc "${scripts[@]}"

if [ ! -f packages/core/dist/guest/guest-init.js ]; then
  echo "lint-sh: packages/core is not built; run npm run build first" >&2
  exit 1
fi
guest_dir=$(mktemp -d)
trap 'rm -rf "$guest_dir"' EXIT
node scripts/write-guest-scripts.mjs "$guest_dir"
find "$guest_dir" -type f -exec shellcheck --norc --shell=dash {} +
