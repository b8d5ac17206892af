"""LoRA on fastft's GPT-OSS: which weights get adapters, PEFT's init, frozen base weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastft.model.gpt_oss import Experts, GptOssForTraining

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = Experts.WEIGHTS  # gate_up_proj, down_proj (PEFT target_parameters)
STRATEGIES = {"qv": ("q_proj", "v_proj"), "attn": ATTENTION, "all": ATTENTION + EXPERTS}
_ALIASES = {"experts": EXPERTS, "mlp.experts": EXPERTS}


@dataclass(frozen=True)
class LoraSettings:
    targets: str = "qv"  # qv | attn | all | comma list, e.g. "q_proj,o_proj,gate_up_proj"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.1  # attention projections only: PEFT's target_parameters (experts) reject dropout
    dtype: torch.dtype = torch.float32  # of the LoRA weights (the trainer's master copy)

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA r must be positive, not {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), not {self.dropout}")
        resolve_targets(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def resolve_targets(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attention module names, expert weight names), each in model order."""
    if spec in STRATEGIES:
        names = STRATEGIES[spec]
    else:
        names = []
        for raw in spec.split(","):
            leaf = raw.strip()
            if not leaf:
                continue
            if leaf in _ALIASES:
                names.extend(_ALIASES[leaf])
                continue
            leaf = leaf.rpartition(".")[-1]  # "self_attn.q_proj" / "mlp.experts.down_proj" -> leaf name
            if leaf not in ATTENTION + EXPERTS:
                raise ValueError(f"unknown LoRA target {raw.strip()!r}: use qv, attn, all or a comma list of "
                                 f"{', '.join(ATTENTION + EXPERTS)}")
            names.append(leaf)
        if not names:
            raise ValueError("empty LoRA target list")
    return tuple(n for n in ATTENTION if n in names), tuple(n for n in EXPERTS if n in names)


def has_lora(model: GptOssForTraining) -> bool:
    return getattr(model, "lora_settings", None) is not None


def apply_lora(model: GptOssForTraining, settings: LoraSettings) -> GptOssForTraining:
    """Freezes every base weight and adds LoRA (A kaiming-uniform a=sqrt(5), B zeros, as PEFT) to the targets."""
    if has_lora(model):
        raise RuntimeError(f"the model already has LoRA ({model.lora_settings})")
    attn, experts = resolve_targets(settings.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for name in attn:
            getattr(layer.self_attn, name).add_lora(settings.r, settings.alpha, settings.dropout, settings.dtype)
        for name in experts:
            layer.mlp.experts.add_lora(name, settings.r, settings.alpha, settings.dtype)
    model.lora_settings = settings
    return model


def trainable_parameters(model: GptOssForTraining) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what the optimizer should train: the LoRA weights once apply_lora ran."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: GptOssForTraining) -> tuple[int, int]:
    """(trainable, total); 4-bit expert weights count by their logical number of values."""
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    if getattr(model, "_host_embedding", None) is not None:
        total += model._host_embedding.numel()
    for m in model.modules():
        if getattr(m, "quantized", False):  # a LoraLinear holding its weight 4-bit
            total += math.prod(m.weight.shape)
        if isinstance(m, Experts):
            total += sum(math.prod(m.weight_shape(w)) for w in Experts.WEIGHTS if w not in m._parameters)
    return trainable, total
