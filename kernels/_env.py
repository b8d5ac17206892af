"""Where a Triton kernel can run: on a CUDA tensor, or on any tensor under TRITON_INTERPRET=1 (the CPU tests).

Each op's entry point asks ``triton_runs`` and otherwise takes its pure-torch reference.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # CPU-only installs: every op runs its reference
    HAS_TRITON = False

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter; read per call (tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs(t: torch.Tensor, dtypes=None) -> bool:
    """Whether an op on ``t`` can take its Triton kernel: triton is installed, ``t`` is on CUDA or the interpreter is
    on, and (when given) ``t``'s dtype is one of ``dtypes``."""
    return HAS_TRITON and (t.is_cuda or interpreting()) and (dtypes is None or t.dtype in dtypes)


def tma_aligned(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor's rows can be TMA-copied: unit column stride, base and row stride multiples of 16
    bytes."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for kernels that size their grids to fill it; 1 elsewhere (the
    interpreter), so CPU tests still cut work into a few programs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
