"""Small random GPT-OSS configs and HF reference helpers, for tests and GPU checks (needs transformers)."""

from __future__ import annotations

import torch

from fastft.model.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """2 layers (one sliding, one full), GQA 4:2, 4 experts top-2, a YaRN ramp that covers several frequencies."""
    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
              max_position_embeddings=256, rope_theta=500.0,
              rope={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 64})
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' GptOssForCausalLM (eager attention, fp32) with weights large enough that the SwiGLU clamps fire,
    random biases and sinks."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_cfg = GptOssConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "experts" in name and "bias" in name:
                p.copy_(3.0 * torch.randn(p.shape, generator=g))
            elif "experts" in name:
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / p.shape[-2] ** 0.5)
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


def packed_batch(lengths, vocab_size: int, device="cpu", generator=None):
    """(input_ids [T], position_ids [T], cu_seqlens [n+1] int32) for documents of the given lengths."""
    T = sum(lengths)
    input_ids = torch.randint(0, vocab_size, (T,), generator=generator).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return input_ids, position_ids, cu


def hf_packed_masks(cu_seqlens: torch.Tensor, window: int | None, dtype=torch.float32) -> dict:
    """HF's per-layer-type 4-D additive masks [1, 1, T, T] for a packed row: causal within documents (and within
    the sliding window for sliding layers), nothing across them."""
    T = int(cu_seqlens[-1])
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    full = (doc[:, None] == doc[None, :]) & (j <= i)
    sliding = full & ((i - j) < window) if window is not None else full
    neg = torch.finfo(dtype).min

    def additive(allowed):
        return torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, neg)[None, None]

    return {"full_attention": additive(full), "sliding_attention": additive(sliding)}


def mxfp4_expert_placeholders(model) -> None:
    """Hold every expert stack of ``model`` (built under ``torch.device("meta")``) as an MXFP4Tensor of its shape, so a
    full-size model never has its bf16 experts in full; ``to_empty`` then allocates the 4-bit buffers (random fill is
    the caller's)."""
    from fastft.mxfp4 import MXFP4Tensor

    for layer in model.model.layers:
        ex = layer.mlp.experts
        for name in ex.WEIGHTS:
            E, fan_in, fan_out = ex.weight_shape(name)
            ex.set_quantized(name, MXFP4Tensor(torch.empty(E, fan_out, fan_in // 32, 16, dtype=torch.uint8),
                                               torch.empty(E, fan_out, fan_in // 32, dtype=torch.uint8)))
