"""Linear with an unmerged LoRA term, over dense or 4-bit weights.

This file will hold the Triton kernels (dequantisation inside the GEMM) and their autograd wrapper; the pure-torch
reference below defines the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_weight(weight, dtype=None):
    """A dense [out, in] tensor from a tensor or a quantized weight object exposing .dequantize()."""
    w = weight.dequantize() if hasattr(weight, "dequantize") and not isinstance(weight, torch.Tensor) else weight
    return w if dtype is None else w.to(dtype)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, exactly PEFT's lora.Linear order of operations."""
    y = F.linear(x, dense_weight(weight, x.dtype), bias)
    if lora_A is not None:
        xd = F.dropout(x, p=dropout, training=training) if dropout > 0 else x
        y = y + F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling
    return y
