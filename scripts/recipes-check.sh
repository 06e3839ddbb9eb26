#!/usr/bin/env bash
# The repository's recipes, built and measured: each recipe's image is a Debian
# debootstrap (minutes under TCG), too slow for `npm test`'s time budget, so they
# are checked here instead: every recipe is built (cached by its digest) and its
# example run once; the numbers land in bench/results/recipes.json.
# Usage: scripts/recipes-check.sh [--only a,b] [-n N]
set -euo pipefail
cd "$(dirname "$0")/.."
npm run --silent build
mkdir -p bench/results
FORKD_BENCH_DIR=bench/results node packages/cli/dist/main.js bench recipes --build --json "$@"
