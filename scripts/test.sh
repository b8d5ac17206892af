#!/usr/bin/env bash
# The test command: installs what it needs (./.venv), then runs the CPU test-suite.
# Triton kernels run under TRITON_INTERPRET=1 when no GPU is present (tests/conftest.py sets it).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m gpu` on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
# The repo root must not be on sys.path: its kernels/ folder would shadow the HF `kernels` hub package.
export PYTHONSAFEPATH=1
python -m pytest "$@"
