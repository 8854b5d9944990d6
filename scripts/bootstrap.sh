#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (CPU-only, a few GB).
# SGLang is installed with --no-deps from an exact-pinned lock file: its own requirements
# would pull CUDA kernel packages that a CPU machine cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP=.venv/.lragent-installed
WANT="$(cat requirements-cpu.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
echo "bootstrap: installing pinned requirements (first time: ~2 minutes, ~5 GB)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-cpu.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "$WANT" > "$STAMP"
