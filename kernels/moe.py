"""GPT-OSS MoE block: top-k router, experts with clamped SwiGLU, unmerged LoRA on the experts.

This file will hold the Triton grouped-GEMM kernels and their autograd wrapper; the pure-torch reference below
defines the math (equal to transformers' GptOssMLP with PEFT target_parameters LoRA on the experts).

Expert LoRA layout (PEFT ``target_parameters`` on a 3-D parameter [E, in, out]):
  A: [r*E, in]  — expert e owns rows e*r : (e+1)*r                     (A.view(E, r, in)[e])
  B: [out, r*E] — expert e owns columns e, E+e, 2E+e, ... (strided)    (B.view(out, r, E)[:, :, e])
  delta W_e [in, out] = scaling * A_e^T @ B_e^T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.kernels.lora_linear import dense_weight


def expert_lora_factors(lora, num_experts: int):
    """(A [E, r, in], B [E, out, r], scaling) from PEFT's flat layout."""
    A, B, scaling = lora
    A_e = A.view(num_experts, -1, A.shape[-1])
    B_e = B.view(B.shape[0], -1, num_experts).permute(2, 0, 1)
    return A_e, B_e, scaling


def route(x, router_weight, router_bias, top_k):
    """Top-k on raw logits, softmax over the kept values (in the logits' dtype, as HF)."""
    logits = F.linear(x, router_weight, router_bias)
    top_values, top_index = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_values, dim=-1, dtype=top_values.dtype), top_index


def clamped_swiglu(gate_up, limit=7.0, alpha=1.702):
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # interleaved: even = gate, odd = up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def moe_reference(x, router_weight, router_bias, top_k, gate_up, gate_up_bias, down, down_bias,
                  gate_up_lora=None, down_lora=None, limit=7.0, alpha=1.702):
    """Loop over experts (tests, CPU). x [T, H] -> [T, H]."""
    weights, index = route(x, router_weight, router_bias, top_k)
    W_gu, W_d = dense_weight(gate_up, x.dtype), dense_weight(down, x.dtype)
    E = W_gu.shape[0]
    lora_gu = expert_lora_factors(gate_up_lora, E) if gate_up_lora is not None else None
    lora_d = expert_lora_factors(down_lora, E) if down_lora is not None else None
    out = torch.zeros_like(x)
    for e in range(E):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        h = x[token]
        gu = h @ W_gu[e] + gate_up_bias[e]
        if lora_gu is not None:
            A, B, s = lora_gu
            gu = gu + (h @ A[e].t().to(h.dtype)) @ B[e].t().to(h.dtype) * s
        act = clamped_swiglu(gu, limit, alpha)
        y = act @ W_d[e] + down_bias[e]
        if lora_d is not None:
            A, B, s = lora_d
            y = y + (act @ A[e].t().to(h.dtype)) @ B[e].t().to(h.dtype) * s
        out = out.index_add(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out
