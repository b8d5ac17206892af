"""A value derived from a tensor, reused while that very tensor is alive and unmodified.

The host issues every launch of a step one by one, so work that repeats per layer on unchanged inputs is host time
spent again: e.g. the document tables attention derives from cu_seqlens (the same tensor for all 24 layers, forward
and recompute). Only for tensors nobody writes through ``.data`` (which bypasses the version counter).
"""

from __future__ import annotations

import weakref

import torch


class TensorMemo:
    """``get(tensor, key, make)`` returns ``make()``'s value for (tensor, key), recomputed when the tensor was
    modified in place since (its version counter moved) or is another tensor object; entries die with their tensor.
    Inference-mode tensors (no version counter) are never cached."""

    def __init__(self):
        self._entries = {}  # id(tensor) -> (weakref, version, key, value)

    def get(self, tensor: torch.Tensor, key, make):
        try:
            version = tensor._version
        except RuntimeError:  # inference tensor
            return make()
        k = id(tensor)
        slot = self._entries.get(k)
        if slot is not None and slot[0]() is tensor and slot[1] == version and slot[2] == key:
            return slot[3]
        value = make()
        ref = weakref.ref(tensor, lambda dead, k=k: self._forget(k, dead))
        self._entries[k] = (ref, version, key, value)
        return value

    def _forget(self, k, dead_ref):
        # a later tensor may reuse the id: drop the entry only if it is still the dead tensor's
        slot = self._entries.get(k)
        if slot is not None and slot[0] is dead_ref:
            del self._entries[k]
