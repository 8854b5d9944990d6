#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (CPU-only, a few GB).
# SGLang is installed with --no-deps from an exact-pinned lock file: its own requirements
# would pull CUDA kernel packages that a CPU machine cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
# Chromium for the dashboard's browser test (tests/test_dashboard.py skips without it); as root or in CI only.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "bootstrap: installing chromium (apt-get)" >&2
  { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
    || echo "bootstrap: could not install chromium; the dashboard browser test will skip" >&2
fi
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
