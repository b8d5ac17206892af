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


class MXFP4Tensor:
    """A weight kept in MXFP4 in its stored orientation ``[..., out, in]``; never densified except on request.

    ``dequantize()`` returns the layout the model's math uses: ``[E, in, out]`` for 3-D expert stacks (HF's
    GptOssExperts parameters) and ``[out, in]`` for 2-D linear weights (nn.Linear).
    Kernels read ``blocks``/``scales`` directly.
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise TypeError("MXFP4 blocks and scales must be uint8")
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
        self.blocks, self.scales = blocks, scales

    @property
    def stored_shape(self) -> tuple:  # [..., out, in]
        return (*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK)

    @property
    def shape(self) -> tuple:
        s = self.stored_shape
        return (s[0], s[2], s[1]) if len(s) == 3 else s

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to(self, device) -> "MXFP4Tensor":
        return MXFP4Tensor(self.blocks.to(device), self.scales.to(device))

    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_mxfp4(self.blocks, self.scales, dtype)
        return w.transpose(-2, -1).contiguous() if w.dim() == 3 else w
