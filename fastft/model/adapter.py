"""LoRA adapters in PEFT 0.21's on-disk format (``adapter_model.safetensors`` + ``adapter_config.json``).

Key names are PEFT's: ``base_model.model.<HF module path>.lora_A.weight``. PEFT wraps each targeted expert parameter
in a ParamWrapper, nesting them in the experts' parameter order, so with both expert weights targeted gate_up_proj's
LoRA sits one level down (``mlp.experts.base_layer.lora_A.weight``) and down_proj's on top (``mlp.experts.lora_A``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastft.model.gpt_oss import GptOssForTraining
from fastft.model.lora import LoraSettings, apply_lora, has_lora, resolve_targets

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_VERSION = "0.21.2"  # the PEFT release whose format this writes (tests check the fields against it)
_PREFIX = "base_model.model."


def peft_state(model: GptOssForTraining) -> dict[str, torch.nn.Parameter]:
    """PEFT key -> LoRA parameter of ``model``."""
    attn, experts = resolve_targets(model.lora_settings.targets)
    out = {}
    for i, layer in enumerate(model.model.layers):
        base = f"{_PREFIX}model.layers.{i}"
        for name in attn:
            mod = getattr(layer.self_attn, name)
            out[f"{base}.self_attn.{name}.lora_A.weight"] = mod.lora_A
            out[f"{base}.self_attn.{name}.lora_B.weight"] = mod.lora_B
        for depth, name in enumerate(experts):
            wrap = ".base_layer" * (len(experts) - 1 - depth)  # the first-wrapped weight ends up innermost
            A, B, _ = layer.mlp.experts.lora(name)
            out[f"{base}.mlp.experts{wrap}.lora_A.weight"] = A
            out[f"{base}.mlp.experts{wrap}.lora_B.weight"] = B
    return out


def adapter_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as PEFT 0.21 writes it for a plain LoRA."""
    attn, experts = resolve_targets(settings.targets)
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": settings.alpha,
        "lora_bias": False,
        # PEFT refuses dropout whenever target_parameters is set, so such an adapter must say 0 to load there
        # (fastft still trained the attention adapters with settings.dropout).
        "lora_dropout": 0.0 if experts else settings.dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16,
        "r": settings.r, "rank_pattern": {}, "revision": None, "target_modules": sorted(attn),
        "target_parameters": [f"mlp.experts.{name}" for name in experts] or None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
        "use_rslora": False, "velora_config": None,
    }


def save_adapter(model: GptOssForTraining, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Writes the LoRA weights (in their own dtype, on CPU) and PEFT's config; returns the directory."""
    if not has_lora(model):
        raise RuntimeError("save_adapter: the model has no LoRA (call apply_lora first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in peft_state(model).items()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(out_dir / CONFIG_NAME, "w") as f:
        json.dump(adapter_config(model.lora_settings, base_model_name_or_path), f, indent=2, sort_keys=True)
    return out_dir


def settings_from_config(cfg: dict, dropout: float | None = None) -> LoraSettings:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "modules_to_save", "trainable_token_indices") if cfg.get(k)]
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"adapter uses PEFT features fastft does not support: {', '.join(unsupported)}")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):
        raise ValueError(f"regex target_modules {modules!r} are not supported; use a list of module names")
    targets = ",".join([*modules, *(cfg.get("target_parameters") or [])])
    return LoraSettings(targets=targets, r=int(cfg["r"]), alpha=cfg["lora_alpha"],
                        dropout=cfg.get("lora_dropout", 0.0) if dropout is None else dropout)


@torch.no_grad()
def load_adapter(model: GptOssForTraining, adapter_dir: str | Path, dropout: float | None = None):
    """Loads a PEFT-format LoRA adapter into ``model``.

    With no LoRA on the model yet, adds it as the adapter's config says (``dropout`` overrides the saved one, which
    is 0 for adapters with expert targets). With LoRA already applied (resuming), targets and r must match."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{adapter_dir}: no {p.name} (not a PEFT LoRA adapter directory)")
    with open(config_path) as f:
        saved = settings_from_config(json.load(f), dropout)
    if not has_lora(model):
        apply_lora(model, saved)
    else:
        mine = model.lora_settings
        if resolve_targets(mine.targets) != resolve_targets(saved.targets) or mine.r != saved.r:
            raise ValueError(f"{adapter_dir}: adapter (targets {saved.targets}, r {saved.r}) does not match the "
                             f"model's LoRA (targets {mine.targets}, r {mine.r})")
        if mine.alpha != saved.alpha:
            raise ValueError(f"{adapter_dir}: adapter lora_alpha {saved.alpha} != the model's {mine.alpha}")
    params = peft_state(model)
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: keys do not match the model's LoRA; missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        for key, p in params.items():
            t = f.get_tensor(key)
            if t.shape != p.shape:
                raise ValueError(f"{weights_path}: {key} has shape {list(t.shape)}, expected {list(p.shape)}")
            p.copy_(t)
    return model
