#!/usr/bin/env bash
# Creates ./.venv with everything fastft needs (CPU torch, pinned versions from constraints-ci.txt) and installs
# fastft into it in editable mode. Idempotent: re-runs only when constraints-ci.txt or setup.py change.
# Usage: source scripts/bootstrap.sh      (or bash it; other scripts call it)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.fastft-stamp"
want=$(cat "$root/constraints-ci.txt" "$root/setup.py" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] creating $venv (first run installs torch & co., a few minutes)" >&2
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints-ci.txt")
  # torch first and exactly pinned, so nothing later can pull a CUDA build.
  "${pip[@]}" "torch==2.13.0" "numpy==2.3.5" setuptools wheel
  # deepspeed ships only a source archive whose setup imports torch: build it against the torch above.
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation deepspeed
  "${pip[@]}" -e "$root[gpu,dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
