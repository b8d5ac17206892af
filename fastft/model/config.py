"""GPT-OSS configuration: the subset of HF's ``config.json`` that the model reads, plus YaRN RoPE frequencies."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

# What HF's GptOssConfig fills in when a config.json leaves rope parameters out.
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


@dataclass
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] | None = None  # default: sliding, full, sliding, full, ...
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope: dict = field(default_factory=lambda: dict(_DEFAULT_ROPE))  # rope_type + YaRN parameters, no theta
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    quant_method: str | None = None  # "mxfp4" for the hub's 4-bit expert checkpoints

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """From a GPT-OSS ``config.json``: the hub's (``rope_scaling`` + ``rope_theta``) or transformers 5's
        (``rope_parameters`` holding ``rope_theta``) spelling."""
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"not a GPT-OSS config (model_type {d.get('model_type')!r})")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or _DEFAULT_ROPE)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 150000.0
        if rope["rope_type"] == "yarn":
            # HF fills original_max_position_embeddings from max_position_embeddings when absent.
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 131072))
        known = {f.name for f in fields(cls)} - {"rope", "rope_theta", "quant_method"}
        kwargs = {k: v for k, v in d.items() if k in known}
        quant = (d.get("quantization_config") or {}).get("quant_method")
        return cls(**kwargs, rope=rope, rope_theta=float(theta), quant_method=quant)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """A transformers-5 style config.json dict (for GptOssConfig / save_pretrained round trips)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rope", "rope_theta",
                                                                                    "quant_method")}
        d["rope_parameters"] = {**self.rope, "rope_theta": self.rope_theta}
        d["model_type"] = "gpt_oss"
        d["architectures"] = ["GptOssForCausalLM"]
        return d


def rope_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, attention_scaling): transformers' default / YaRN rope init, step for step.

    The scaling multiplies cos and sin, so it scales both q and k (their product by its square)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rope_type = cfg.rope.get("rope_type", "default")
    if rope_type == "default":
        return (1.0 / pos_freqs).to(device), 1.0
    if rope_type != "yarn":
        raise NotImplementedError(f"rope_type {rope_type!r} (fastft supports default and yarn)")
    p = cfg.rope
    factor = p.get("factor")
    original_max = p["original_max_position_embeddings"]
    if factor is None:
        factor = cfg.max_position_embeddings / original_max

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):  # HF's default when the key is absent is True
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.to(device), attention_factor
