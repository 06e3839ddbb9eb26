#!/usr/bin/env bash
# Lints forkd's C helpers (the VMM launcher and page capturer on the host, the
# guest's helper): every gcc warning below is an error, gcc's static analyser
# (-fanalyzer) runs over each file, and cppcheck looks for the bug classes
# (its "style" class is taste and not gated). The real builds (packages/core's
# build script, the image build for the guest helper) compile the same sources;
# this pass only checks, its object files go to /dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."

sources=(packages/core/native/*.c packages/agent/native/*.c)
warnings=(
  -Wall -Wextra -Werror
  -Wformat=2 -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wnull-dereference
  -Wvla -Wundef -Wpointer-arith -Wcast-qual
)

for source in "${sources[@]}"; do
  # -O2 and _FORTIFY_SOURCE: some warnings (buffer sizes, uninitialised use) need the optimiser's view.
  cc -std=gnu11 -O2 -D_FORTIFY_SOURCE=2 "${warnings[@]}" -c -o /dev/null "$source"
  # The analyser at -O0: gcc 12's optimiser folds away what it should see (a double free() at -O2 passes).
  cc -std=gnu11 -O0 -Werror -fanalyzer -c -o /dev/null "$source"
done

# --library=posix: cppcheck then knows _exit() and friends never return.
cppcheck --quiet --error-exitcode=1 --std=c11 --library=posix \
  --enable=warning,performance,portability --inline-suppr "${sources[@]}"
