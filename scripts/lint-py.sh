#!/usr/bin/env bash
# Type-checks and lints forkd's Python with Debian's tools (no PyPI here): the SDK
# and its tests under mypy --strict (settings in sdk/python/pyproject.toml), the
# guest's warm worker under mypy --strict too, and pyflakes over all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's interpreter, which has python3-mypy: a python3 earlier on PATH (pyenv) has not.
python=/usr/bin/python3
python_files=(sdk/python packages/agent/python)

(cd sdk/python && "$python" -m mypy)
# The worker runs on whatever Python the guest image has; 3.7 is the oldest it parses on (annotations).
"$python" -m mypy --strict --python-version 3.7 packages/agent/python/pyworker.py
pyflakes3 "${python_files[@]}"
