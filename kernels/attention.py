"""Varlen attention for GPT-OSS: packed documents, attention sinks, sliding window, GQA.

This file will hold the Triton kernels and their autograd wrapper; the pure-torch reference below defines the math.
"""

from __future__ import annotations

import torch


def varlen_attention_reference(q, k, v, cu_seqlens, sinks=None, window=None, softmax_scale=None):
    """HF-eager GPT-OSS attention over packed documents; materialises [Hq, L, L] per document (tests, CPU)."""
    T, Hq, D = q.shape
    groups = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        L = end - start
        if L == 0:
            continue
        qd = q[start:end].transpose(0, 1).float()  # [Hq, L, D]
        kd = k[start:end].transpose(0, 1).float().repeat_interleave(groups, 0)
        vd = v[start:end].transpose(0, 1).float().repeat_interleave(groups, 0)
        scores = (qd @ kd.transpose(1, 2)) * scale
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        visible = j <= i
        if window is not None:
            visible &= (i - j) < window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(Hq, 1, 1).expand(Hq, L, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :L]
        outs.append((probs @ vd).transpose(0, 1).to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)
