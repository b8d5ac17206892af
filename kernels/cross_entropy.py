"""Fused linear cross-entropy: the loss of hidden @ weight^T without materialising [T, V] logits.

This file will hold the Triton kernels and their autograd wrapper; the pure-torch reference below defines the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """Materialises fp32 logits [T, V]; "mean" divides by the count of non-ignored labels (0 if there are none)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    logits = (hidden @ weight.t()).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)
