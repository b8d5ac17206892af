"""Kernel backends: the six places where fastft's model can run other code for the same math.

A backend is a set of six functions with fixed contracts (below). ``torch`` holds the pure-torch references that
live beside each Triton kernel in ``fastft.kernels.<op>``; ``triton`` holds the kernels. ``--kernels auto`` picks
``triton`` on CUDA and ``torch`` elsewhere. An op whose Triton kernel is unavailable falls back to its reference,
and ``Backend.sources`` says which one each op runs, so a run never silently claims a kernel it did not use.

Contracts (all tensors on one device; T = tokens of the packed batch, flattened):
  attention(q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D], cu_seqlens int32 [B+1], sinks [Hq] | None,
            window: int | None, softmax_scale: float | None) -> [T,Hq,D]
      causal within each document, nothing across; window W: query i sees keys j with i-W < j <= i;
      exp(sinks[h]) joins the softmax denominator unscaled and contributes no value.
  loss(hidden [T,H], weight [V,H] (tensor, or a frozen fastft.quant.Int8RowsTensor), labels [T] int64,
       ignore_index=-100, reduction="mean") -> fp32 scalar
      labels are already shifted (labels[i] is the target of position i); all ignored -> 0, never NaN.
      An Int8RowsTensor means its dequantize(hidden.dtype).
  lora_linear(x [...,in], weight [out,in] (tensor, or quantized object with .dequantize()), bias [out] | None,
              lora_A [r,in] | None, lora_B [out,r] | None, scaling: float, dropout: float, training: bool)
      -> x W^T + b + scaling * (dropout(x) A^T) B^T
  moe(x [T,H], router_weight [E,H], router_bias [E], top_k, gate_up [E,H,2I], gate_up_bias [E,2I],
      down [E,I,H], down_bias [E,H], gate_up_lora, down_lora, limit=7.0, alpha=1.702) -> [T,H]
      experts may be quantized objects with .dequantize() returning the [E,in,out] layout; *_lora is None or
      (A [r*E,in], B [out,r*E], scaling) in PEFT's target_parameters layout (see fastft.kernels.moe).
  rms_norm(x [...,H], weight [H] (fp32 in the model), eps: float) -> [...,H] in x's dtype
      (weight * (x.float() * rsqrt(mean(x.float()^2) + eps))).to(x.dtype) (fp64 for fp64 x); grads for x and weight.
  rope(x [T,heads,D] (may be a strided view), cos [T,D/2], sin [T,D/2] in x's dtype) -> [T,heads,D]
      half-split rotation (not interleaved): cat(x1*cos - x2*sin, x2*cos + x1*sin); cos/sin get no gradient.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS = ("attention", "loss", "lora_linear", "moe", "rms_norm", "rope")

_recompute = threading.local()


@contextlib.contextmanager
def _setting(name: str, value):
    """Sets the thread-local ``name`` for the enclosed block, then restores what it was."""
    before = getattr(_recompute, name, None)
    setattr(_recompute, name, value)
    try:
        yield
    finally:
        setattr(_recompute, name, before)


def output_unused():
    """Marks a checkpoint's recompute of a region whose last op is the MoE block: backward needs only what the block
    saves, never its output, so an op may skip the work that only produces the output (the MoE's down GEMM, a third
    of its recomputed FLOPs). The region's owner guarantees that nothing after the block saves its output.
    Thread-local: the recompute runs, and enters this, in the autograd engine's thread."""
    return _setting("active", True)


def is_output_unused() -> bool:
    return bool(getattr(_recompute, "active", False))


def recompute_skips_output():
    """``context_fn`` for torch.utils.checkpoint: the forward as usual, the recompute under ``output_unused``."""
    return contextlib.nullcontext(), output_unused()


class ActivationStash:
    """Tensors one checkpointed layer's forward keeps for that layer's recompute, so an op may skip recomputing them
    (the MoE keeps its gate_up GEMM's output: a quarter of the expert FLOPs of a step). fastft.model.layer_graphs
    gives a stash to each layer its memory budget allows. A buffer keeps its address from step to step (a CUDA graph
    replay writes and reads the memory its capture did).

    Spilled stashes (layer_graphs, with activation offload): two layers share ``buffers`` (``shared_with``), and
    between its forward and its recompute a layer's buffers live in host memory. A buffer written with
    ``partial=True`` comes back only in part, its first ``spill_share`` of rows: the op recomputes the rest (rows
    are independent), which keeps the copy within what the link moves while the next layer computes."""

    def __init__(self, shared_with: "ActivationStash | None" = None, spill_share: float | None = None):
        self._buffers = shared_with._buffers if shared_with is not None else {}
        self._written = {}  # name -> partial
        self.spill_share = spill_share  # None: every buffer stays whole on the device

    def buffer(self, name: str, shape, dtype: torch.dtype, device: torch.device, partial: bool = False) -> torch.Tensor:
        """Where the forward writes ``name`` (allocated once per shape and dtype). ``partial``: the op can recompute
        any rows of it past the first ones."""
        t = self._buffers.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != torch.device(device):
            t = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        self._written[name] = partial
        return t

    def get(self, name: str) -> torch.Tensor | None:
        """What the forward wrote into ``name`` (None if it wrote nothing there)."""
        return self._buffers[name] if name in self._written else None

    def rows(self, name: str) -> int:
        """How many leading rows of ``name`` hold the forward's values when the recompute reads it."""
        n = self._buffers[name].shape[0]
        return int(n * self.spill_share) if self.spill_share is not None and self._written[name] else n

    def written(self) -> dict:
        """name -> (buffer, rows a spill moves: all but a partial buffer's tail)."""
        return {name: (self._buffers[name], self.rows(name)) for name in self._written}


def stashing(stash: ActivationStash | None):
    """Ops run inside keep what they can in ``stash`` (in a forward) or read it back (in the recompute, under
    ``output_unused``). Thread-local, like output_unused."""
    return _setting("stash", stash)


def active_stash() -> ActivationStash | None:
    return getattr(_recompute, "stash", None)


# op -> (module, reference function, triton function)
_IMPLS = {
    "attention": ("fastft.kernels.attention", "varlen_attention_reference", "varlen_attention"),
    "loss": ("fastft.kernels.cross_entropy", "linear_cross_entropy_reference", "fused_linear_cross_entropy"),
    "lora_linear": ("fastft.kernels.lora_linear", "lora_linear_reference", "lora_linear"),
    "moe": ("fastft.kernels.moe", "moe_reference", "moe"),
    "rms_norm": ("fastft.kernels.rms_norm", "rms_norm_reference", "rms_norm"),
    "rope": ("fastft.kernels.rope", "apply_rope_reference", "apply_rope"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable
    loss: Callable
    lora_linear: Callable
    moe: Callable
    rms_norm: Callable
    rope: Callable
    sources: dict = field(default_factory=dict)  # op -> "triton" | "torch"


def _load(module: str, attr: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def resolve_name(name: str, device: torch.device | str) -> str:
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"--kernels must be auto, torch or triton, not {name!r}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    name = resolve_name(name, device)
    fns, sources = {}, {}
    for op, (module, ref, fast) in _IMPLS.items():
        fn = _load(module, fast) if name == "triton" else None
        sources[op] = "triton" if fn is not None else "torch"
        fns[op] = fn if fn is not None else _load(module, ref)
        if fns[op] is None:
            raise ImportError(f"no implementation of {op} in {module}")
    return Backend(name=name, sources=sources, **fns)
