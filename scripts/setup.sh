#!/usr/bin/env bash
# Sets up .venv: torch==2.13.0 (the CPU wheel) first, so nothing pulls a CUDA build, then dcnc with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
