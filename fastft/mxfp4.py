"""MXFP4, the 4-bit format of gpt-oss's released expert weights (OCP microscaling).

Hub layout for an expert tensor whose HF parameter is ``[E, in, out]``:
  ``*_blocks`` uint8 ``[E, out, in // 32, 16]`` — 32 e2m1 values per block, two per byte, low nibble first;
  ``*_scales`` uint8 ``[E, out, in // 32]`` — one e8m0 exponent per block, bias 127.
So the stored matrix is ``[E, out, in]`` (``in`` contiguous) and HF's parameter is its transpose.
"""

from __future__ import annotations

import torch

# e2m1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., G, 16]`` uint8 blocks + ``[..., G]`` uint8 scales -> ``[..., G * 32]`` values (stored orientation)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - SCALE_BIAS)
    return vals.flatten(-2).to(dtype)


def dequantize_expert_param(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Hub MXFP4 expert tensors -> the HF parameter layout ``[E, in, out]`` (what GptOssExperts holds)."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()
