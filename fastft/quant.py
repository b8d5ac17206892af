"""Quantised base weights: which tensors fastft quantises, to what, and the holders the kernels read.

Policy (gpt-oss-20b, 20.9 B parameters, 41.8 GB in bf16; the goal is training on a 24 GB card). What the trainer
loads on CUDA (``load_model(..., experts="mxfp4", linears="nf4", lm_head="int8", offload_embedding=True)``), resident
on the GPU:
  * MoE experts (``mlp.experts.gate_up_proj`` / ``down_proj``, 19.11 B parameters): MXFP4, the checkpoint's own
    format, kept bit-exact when the checkpoint ships it (4.25 bits/weight): 10.15 GB (9.46 GiB). From a bf16
    checkpoint they are quantised here with ``quantize_mxfp4`` (OCP MX rules), or with NF4 when ``experts="nf4"``
    asks for it (the moe kernel reads MXFP4 packed; NF4 expert stacks are dequantised per call).
  * Attention projections (q/k/v/o weights, 0.637 B parameters): NF4 made by bitsandbytes' own ``quantize_4bit``
    (blocksize 64, double-quantised absmax: ~4.13 bits/weight): 0.33 GB (0.31 GiB) instead of 1.27 GB in bf16.
    fastft writes no NF4 quantiser.
  * lm_head (0.579 B parameters): int8 with one fp32 scale per vocabulary row (``Int8RowsTensor``, absmax / 127,
    round to nearest): 0.58 GB (0.54 GiB) instead of 1.16 GB (1.08 GiB) in bf16. The fused linear-cross-entropy
    kernel decodes it slab by slab into a reused bf16 scratch; 8 bits per row keep the logits' error far below
    4-bit's. ``load_model(..., lm_head="bf16")`` keeps it dense.
  * Input embedding (0.579 B parameters, 1.16 GB bf16): offloaded to pinned host memory
    (``GptOssForTraining.offload_embedding``); a step gathers only its T rows there and copies them over. Not
    quantised, and 0 bytes on the GPU.
  * Router, sinks, norms (fp32) and biases (9.2 M parameters): kept dense, 0.019 GB.
Total resident weights 11.08 GB = 10.32 GiB (10.86 GiB with a bf16 lm_head; issue #6 bar: <= 11 GiB), leaving the
rest of a 24 GB card to activations, LoRA weights and their optimizer state. ``weight_bytes(model)`` measures this
breakdown on a loaded model.

Holders expose ``.dequantize(dtype)`` (the model's layout), ``.shape``, ``.device``, ``.to(device)`` and ``.nbytes()``,
so pure-torch references work on them unchanged; kernels read the packed fields directly.
"""

from __future__ import annotations

import torch

from fastft.mxfp4 import BLOCK, SCALE_BIAS, MXFP4Tensor

NF4_BLOCKSIZE = 64

# ---------------------------------------------------------------------------------------------------------------------
# MXFP4 quantiser (OCP Microscaling v1.0: shared exponent = floor(log2(absmax)) - emax(e2m1), emax = 2)

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; bit 3 is the sign
_E2M1_EMAX = 2


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each fp32 value, ties to the even code, saturating at +-6 (uint8 in 0..15)."""
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=scaled.device)
    mids = (mags[1:] + mags[:-1]) / 2
    a = scaled.abs().clamp(max=6.0)
    down = torch.bucketize(a, mids, right=False)  # a tie lands on the lower code
    up = torch.bucketize(a, mids, right=True)  # a tie lands on the upper code
    code = torch.where(down % 2 == 0, down, up)  # they differ only on ties: keep the even one
    return (code | (torch.signbit(scaled).to(code.dtype) << 3)).to(torch.uint8)


def _quantize_mxfp4_rows(w: torch.Tensor):
    """[R, K] (K % 32 == 0) -> blocks [R, K/32, 16], scales [R, K/32]."""
    g = w.float().contiguous().reshape(w.shape[0], -1, BLOCK)
    amax = g.abs().amax(dim=-1)
    # frexp gives amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly (no log2 rounding).
    shared = torch.frexp(amax).exponent.to(torch.int32) - 1 - _E2M1_EMAX
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -SCALE_BIAS)).clamp(-SCALE_BIAS, SCALE_BIAS)
    codes = _e2m1_codes(torch.ldexp(g, -shared.unsqueeze(-1).float()))  # exact: a power-of-two scaling
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first, as the hub layout
    return packed, (shared + SCALE_BIAS).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor, chunk_elems: int = 1 << 24) -> MXFP4Tensor:
    """A weight in the model's layout -> MXFP4Tensor, the inverse of ``MXFP4Tensor.dequantize``.

    2-D ``[out, in]`` (nn.Linear) or 3-D ``[E, in, out]`` (GptOssExperts); blocks of 32 run along ``in``, which must be
    a multiple of 32. Values already on the MXFP4 grid come back bit-exact. Works in row chunks of ``chunk_elems``
    (default 16 M values, ~64 MB of fp32 temporaries x a few) so a whole expert stack is never upcast at once.
    """
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_mxfp4 takes [out, in] or [E, in, out], not {tuple(w.shape)}")
    stored = w.transpose(-2, -1) if w.dim() == 3 else w  # -> [..., out, in]
    if stored.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs in_features % {BLOCK} == 0, got {stored.shape[-1]}")
    lead, K = stored.shape[:-1], stored.shape[-1]
    stored3 = stored.reshape(-1, *stored.shape[-2:])  # [E or 1, out, in]; a view for both layouts
    R = stored3.shape[1]
    blocks = torch.empty(stored3.shape[0], R, K // BLOCK, BLOCK // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(stored3.shape[0], R, K // BLOCK, dtype=torch.uint8, device=w.device)
    step = max(1, chunk_elems // K)
    for e in range(stored3.shape[0]):
        for r0 in range(0, R, step):
            blocks[e, r0:r0 + step], scales[e, r0:r0 + step] = _quantize_mxfp4_rows(stored3[e, r0:r0 + step])
    return MXFP4Tensor(blocks.reshape(*lead, K // BLOCK, BLOCK // 2), scales.reshape(*lead, K // BLOCK))


# ---------------------------------------------------------------------------------------------------------------------
# NF4 via bitsandbytes


class NF4Tensor:
    """A weight in bitsandbytes' NF4 (packed uint8 ``data`` + its ``QuantState``), in whatever layout it was given.

    Packing is bnb's: the tensor is flattened row-major, element 2i sits in the HIGH nibble of byte i, and absmax
    covers flat blocks of ``blocksize`` values (a block may straddle rows). With double quantisation the absmax is a
    uint8 code into ``state2.code`` times ``state2.absmax`` per 256 blocks, plus ``offset``.
    """

    def __init__(self, data: torch.Tensor, quant_state):
        if data.dtype != torch.uint8:
            raise TypeError("NF4 data must be uint8 (bnb quant_storage=torch.uint8)")
        if quant_state.quant_type != "nf4":
            raise ValueError(f"expected an nf4 QuantState, got {quant_state.quant_type!r}")
        self.data, self.quant_state = data, quant_state

    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> "NF4Tensor":
        import bitsandbytes.functional as bnbf

        if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            w = w.float()
        data, state = bnbf.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4",
                                         compress_statistics=double_quant, quant_storage=torch.uint8)
        return cls(data, state)

    @property
    def shape(self) -> tuple:
        return tuple(self.quant_state.shape)

    @property
    def dtype(self) -> torch.dtype:  # the dtype the weight was quantised from
        return self.quant_state.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def code(self) -> torch.Tensor:  # the 16 NF4 levels, fp32
        return self.quant_state.code

    def to(self, device) -> "NF4Tensor":
        from bitsandbytes.functional import QuantState

        qs = self.quant_state
        state2 = None
        if qs.nested:
            state2 = QuantState(absmax=qs.state2.absmax.to(device), code=qs.state2.code.to(device),
                                blocksize=qs.state2.blocksize, quant_type=qs.state2.quant_type, dtype=qs.state2.dtype)
        new = QuantState(absmax=qs.absmax.to(device), shape=qs.shape, code=qs.code.to(device), blocksize=qs.blocksize,
                         quant_type=qs.quant_type, dtype=qs.dtype,
                         offset=qs.offset.to(device) if qs.nested else None, state2=state2)
        return NF4Tensor(self.data.to(device), new)

    def nbytes(self) -> int:
        qs = self.quant_state
        n = self.data.numel() + qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * 4
        if qs.nested:
            n += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + 4
        return n

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block fp32 absmax [ceil(numel / blocksize)], double quantisation undone exactly as bnb does it
        (``code2[q] * absmax2[i // blocksize2] + offset`` in fp32).

        Kept after the first call: the weight is frozen, and rebuilding it costs five small launches per GEMM call
        (~1,400 per gpt-oss-20b step with NF4 attention) for numel / 64 floats (1.6 MB per layer, 38 MB in all)."""
        cached = getattr(self, "_absmax_cache", None)
        if cached is None:
            cached = self._absmax_cache = self._absmax_fp32()
        return cached

    def _absmax_fp32(self) -> torch.Tensor:
        qs = self.quant_state
        if not qs.nested:
            return qs.absmax.float()
        s2 = qs.state2
        n = qs.absmax.numel()
        scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:n]
        return s2.code.float()[qs.absmax.long()] * scale + qs.offset.float()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pure-torch dequantisation with bnb's flat-block semantics (what its quantiser and CUDA kernel use)."""
        flat = self.data.reshape(-1)
        nib = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[: self.numel()].long()
        idx = torch.arange(self.numel(), device=flat.device) // self.blocksize
        return (self.code.float()[nib] * self.absmax_fp32()[idx]).to(dtype).reshape(self.shape)

    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        if self.device.type == "cpu" and self.shape[-1] % self.blocksize:
            # bnb 0.50.2's native CPU kernel indexes absmax per row, wrong when a block straddles two rows
            return self.decode(dtype)
        return bnbf.dequantize_4bit(self.data, self.quant_state).to(dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> NF4Tensor:
    """Any-shaped tensor -> NF4Tensor (bitsandbytes' quantiser, double-quantised absmax); 3-D expert stacks too."""
    return NF4Tensor.quantize(w, blocksize=blocksize)


# ---------------------------------------------------------------------------------------------------------------------
# int8 rows (the lm_head)


class Int8RowsTensor:
    """A [rows, cols] weight as int8 codes with one fp32 scale per row: ``w ~ data * scale[:, None]``.

    ``quantize`` is absmax / 127 per row with round-half-to-even, bit for bit what bitsandbytes'
    ``int8_vectorwise_quant`` gives on the CPU (its stats are the absmax; the scale here is absmax / 127). It is
    written in torch rather than called: bnb 0.50.2's CUDA kernel takes only fp16 input (a bf16 lm_head would need an
    fp16 copy, which loses bits below 6e-5 and overflows above 65504) and divides with ``__fdividef``, so the GPU
    would round a few ties differently from the CPU; this gives the same codes on both. An all-zero row gets scale 0
    and codes 0 (bnb's gives NaN codes there).
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        if data.dtype != torch.int8 or data.dim() != 2:
            raise TypeError(f"Int8RowsTensor data must be a 2-D int8 tensor, got {data.dtype} {tuple(data.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (data.shape[0],):
            raise TypeError(f"Int8RowsTensor scale must be fp32 [{data.shape[0]}], got {scale.dtype} "
                            f"{tuple(scale.shape)}")
        if scale.device != data.device and not (data.device.type == "cpu" and scale.is_cuda):
            raise ValueError(f"data on {data.device} but scale on {scale.device}")
        self.data, self.scale, self._dtype = data, scale, dtype

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor, *, device=None, dtype: torch.dtype | None = None,
                 chunk_elems: int = 1 << 24) -> "Int8RowsTensor":
        """Per-row absmax int8 of a 2-D floating tensor, on ``device`` (default: w's). Rows go over in chunks of
        ~``chunk_elems`` values (64 MB of fp32 temporaries by default), each first cast to ``dtype`` (the model's
        dtype when loading: the codes then equal quantising the loaded weight), so a host tensor streams to the GPU
        without a full-size copy there."""
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"Int8RowsTensor.quantize takes a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
        device = torch.device(device) if device is not None else w.device
        dtype = dtype or w.dtype
        R, C = w.shape
        data = torch.empty(R, C, dtype=torch.int8, device=device)
        scale = torch.empty(R, dtype=torch.float32, device=device)
        step = max(1, chunk_elems // max(C, 1))
        for r0 in range(0, R, step):
            chunk = w[r0:r0 + step].to(device=device, dtype=dtype).float()
            absmax = chunk.abs().amax(dim=1)
            # torch evaluates 127 / absmax as 127 * (1 / absmax), as in bnb's CPU path: the same rounding
            inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
            data[r0:r0 + step] = torch.round(chunk * inv.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            scale[r0:r0 + step] = absmax / 127.0
        return cls(data, scale, dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> torch.dtype:  # the dtype the weight was quantised from
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Where it decodes to: the scales' device (the codes may stay in host memory, see ``codes_to_host``)."""
        return self.scale.device

    @property
    def codes_on_host(self) -> bool:
        return self.data.device != self.scale.device

    def to(self, device) -> "Int8RowsTensor":
        return Int8RowsTensor(self.data.to(device), self.scale.to(device), self._dtype)

    def codes_to_host(self) -> "Int8RowsTensor":
        """The same weight with its codes in pinned host memory and the scales where they are (a CUDA device): the
        fused loss streams the codes slab by slab (fastft.kernels.cross_entropy), so the GPU holds 4 bytes per row
        instead of the whole [V, H] (0.54 GiB for gpt-oss-20b)."""
        if not self.scale.is_cuda:
            raise ValueError("codes_to_host keeps the scales on a CUDA device; this weight is on the CPU")
        data = torch.empty(self.data.shape, dtype=torch.int8, pin_memory=True)
        return Int8RowsTensor(data.copy_(self.data), self.scale, self._dtype)

    def nbytes(self) -> int:
        """Bytes on its device (codes in host memory do not count)."""
        return (0 if self.codes_on_host else self.data.numel()) + self.scale.numel() * 4

    def numel(self) -> int:
        return self.data.numel()

    def rows(self, index=slice(None), dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
             codes: torch.Tensor | None = None):
        """Decoded rows ``w[index]`` (a slice or an index tensor): codes times scale in fp32, rounded once to
        ``dtype`` (or to ``out``'s dtype, written in place: the fused loss decodes into a reused scratch).
        ``codes``: those rows' codes, already on the scales' device (the loss streams host codes itself)."""
        sel = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index.to(t.device)))
        s = sel(self.scale)
        q = (sel(self.data) if codes is None else codes).to(s.device)  # host codes: copied over for this call
        if out is None:
            out = torch.empty(q.shape, dtype=dtype, device=q.device)
        return torch.mul(q, s.unsqueeze(1), out=out)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(slice(None), dtype)


def quantize_int8_rows(w: torch.Tensor, **kw) -> Int8RowsTensor:
    """2-D tensor -> Int8RowsTensor (per-row absmax / 127); see ``Int8RowsTensor.quantize``."""
    return Int8RowsTensor.quantize(w, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Loader helpers

_EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_ATTN_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight")
SCHEMES = ("mxfp4", "nf4", "int8", "none")  # "dense" / "bf16" (the loader's words) mean "none"


def scheme_for(name: str, experts: str = "mxfp4", linears: str = "nf4", lm_head: str = "none") -> str:
    """The storage scheme the policy above gives an HF parameter name ("none": keep it as loaded)."""
    if name.endswith(_EXPERT_SUFFIXES):
        return experts
    if name.endswith(_ATTN_SUFFIXES):
        return linears
    if name == "lm_head.weight":
        return lm_head
    return "none"


def quantize_weight(name: str, tensor: torch.Tensor, scheme: str = "auto", experts: str = "mxfp4",
                    linears: str = "nf4", lm_head: str = "none"):
    """Quantise one dense tensor as it streams in; ``scheme="auto"`` applies the policy (``scheme_for``).

    Returns an MXFP4Tensor, an NF4Tensor, an Int8RowsTensor, or the tensor itself for "none". Checkpoints that already
    ship MXFP4
    ``*_blocks``/``*_scales`` should be wrapped with ``MXFP4Tensor(blocks, scales)`` instead (bit-exact, no work).
    """
    if scheme == "auto":
        scheme = scheme_for(name, experts, linears, lm_head)
    if scheme in ("dense", "bf16"):
        scheme = "none"
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r} for {name}; choose from {SCHEMES}")
    if scheme == "mxfp4":
        return quantize_mxfp4(tensor)
    if scheme == "nf4":
        return quantize_nf4(tensor)
    if scheme == "int8":
        return quantize_int8_rows(tensor)
    return tensor


def _nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes()


def weight_bytes(model) -> dict[str, int]:
    """Bytes of a GptOssForTraining's base weights by kind, as the policy above groups them: ``experts`` (expert
    weights, 4-bit or dense), ``attention`` (q/k/v/o weights), ``lm_head`` (dense or int8), ``embedding`` (on the
    model's device), ``embedding_host`` (offloaded), ``other`` (router, sinks, norms, biases). LoRA weights are not
    counted."""
    from fastft.model.gpt_oss import Experts, LoraLinear  # here: fastft.model's loader imports this module

    out = dict.fromkeys(("experts", "attention", "lm_head", "embedding", "embedding_host", "other"), 0)
    seen = set()
    for mname, module in model.named_modules():
        if isinstance(module, Experts):  # dense, MXFP4 buffers or a holder
            for w in module.WEIGHTS:
                out["experts"] += _nbytes(module.weight(w))
                seen.update(f"{mname}.{w}{s}" for s in ("", "_blocks", "_scales"))
        elif isinstance(module, LoraLinear) and module.quantized:
            out["attention"] += _nbytes(module.weight)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in seen or "lora_" in name:
            continue
        kind = ("embedding" if name == "model.embed_tokens.weight" else "lm_head" if name == "lm_head.weight" else
                "attention" if name.endswith(_ATTN_SUFFIXES) else "other")
        out[kind] += _nbytes(t)
    head = model.lm_head.weight
    if not isinstance(head, torch.Tensor):  # a quantised holder: not among the parameters
        out["lm_head"] += _nbytes(head)
    host = getattr(model, "_host_embedding", None)
    out["embedding_host"] = _nbytes(host) if host is not None else 0
    return out
