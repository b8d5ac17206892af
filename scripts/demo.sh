#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs (./.venv), then fine-tunes the built-in tiny GPT-OSS model
# on examples/sample.jsonl on the CPU. No downloads beyond the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
python fastft/train.py examples/sample.jsonl --model tiny --output-dir out/demo --overwrite \
  --max-seq-len 512 --batch-size 4 --epochs 4 --learning-rate 5e-3 --lora-targets attn "$@"
