#!/usr/bin/env bash
# On the offline GPU host (torch/triton/transformers/peft preinstalled): installs the carried wheels (.whl/) and
# fastft itself without dependencies. Usage: source scripts/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" >&2; return 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed (PYTHONPATH has the repo)"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers, peft, deepspeed, bitsandbytes, fastft.kernels.moe; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
