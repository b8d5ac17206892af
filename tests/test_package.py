"""Packaging: kernels ship as fastft.kernels and never as a bare `kernels` (the HF kernel hub package's name)."""

import subprocess
import sys

PROBE = """
import importlib.util, json
from transformers.utils import import_utils
before = (import_utils.is_kernels_available(), importlib.util.find_spec("kernels") is not None)
import fastft, fastft.kernels.attention, fastft.kernels.moe
import_utils.is_kernels_available.cache_clear() if hasattr(import_utils.is_kernels_available, "cache_clear") else None
after = (import_utils.is_kernels_available(), importlib.util.find_spec("kernels") is not None)
print(json.dumps({"before": before, "after": after, "kernels_pkg": fastft.kernels.__name__}))
"""


def test_import_fastft_leaves_transformers_kernels_detection_unchanged(tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == out["after"]
    assert out["kernels_pkg"] == "fastft.kernels"


def test_kernel_ops_resolve_through_the_backend_registry():
    from fastft.backends import OPS, get_backend

    torch_backend = get_backend("torch")
    assert set(torch_backend.sources.values()) == {"torch"}
    triton_backend = get_backend("triton")
    assert set(triton_backend.sources) == set(OPS) >= {"attention", "loss", "lora_linear", "moe"}
