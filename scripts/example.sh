#!/usr/bin/env bash
# The README's main command: set up, then run the whole job on the built-in example (train if needed ->
# export -> build ORT fp32/fp16/int8 -> verify each against PyTorch). Extra arguments go to `dcnc run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dcnc run "$@"
