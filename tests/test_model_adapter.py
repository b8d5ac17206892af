"""Adapters in PEFT 0.21's format: real PEFT loads them and reproduces fastft's logits; fastft loads them back."""

import json

import pytest
import torch
from safetensors import safe_open

from fastft.model import LoraSettings, apply_lora, load_adapter, load_model, save_adapter
from fastft.model.lora import resolve_targets, trainable_parameters
from fastft.model.testing import hf_model, hf_packed_masks, packed_batch, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["qv", "attn", "all", "o_proj,mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("base")
    hf_model(cfg).save_pretrained(path)
    return cfg, path


def lora_model(path, targets, seed=1):
    model = load_model(path)
    apply_lora(model, LoraSettings(targets=targets, r=3, alpha=5, dropout=0.1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(cfg):
    return packed_batch([7, 3, 10], cfg.vocab_size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("targets", TARGETS)
def test_peft_reproduces_fastft_logits(base_dir, targets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, base = base_dir
    model = lora_model(base, targets)
    save_adapter(model, tmp_path, base_model_name_or_path=str(base))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path).eval()
    ids, pos, cu = batch(cfg)
    with torch.no_grad():
        got = model.logits(ids, pos, cu)
        want = peft(input_ids=ids[None], position_ids=pos[None],
                    attention_mask=hf_packed_masks(cu, cfg.sliding_window)).logits[0]
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids[None], position_ids=pos[None],
                                                          attention_mask=hf_packed_masks(cu, cfg.sliding_window))
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert (plain.logits[0] - want).abs().max() > 1e-3  # the adapter is really applied


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_files_equal_what_peft_writes(base_dir, targets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, base = base_dir
    save_adapter(lora_model(base, targets), tmp_path / "ours", base_model_name_or_path=str(base))
    attn, experts = resolve_targets(targets)
    peft_cfg = LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0 if experts else 0.1, target_modules=list(attn),
                          target_parameters=[f"mlp.experts.{e}" for e in experts] or None, task_type="CAUSAL_LM")
    hf = AutoModelForCausalLM.from_pretrained(base)
    hf.name_or_path = str(base)
    get_peft_model(hf, peft_cfg).save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    theirs["target_modules"] = sorted(theirs["target_modules"])
    assert ours == theirs
    shapes = []
    for d in ("ours", "peft"):
        with safe_open(tmp_path / d / "adapter_model.safetensors", "pt") as f:
            shapes.append({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("targets", ["attn", "all"])
def test_load_adapter_round_trip(base_dir, targets, tmp_path):
    cfg, base = base_dir
    trained = lora_model(base, targets)
    save_adapter(trained, tmp_path)
    ids, pos, cu = batch(cfg)

    fresh = load_adapter(load_model(base), tmp_path).eval()  # LoRA from the adapter's config
    resumed = load_model(base)  # the trainer's resume path: apply_lora with its settings, then load
    apply_lora(resumed, trained.lora_settings)
    load_adapter(resumed, tmp_path)
    with torch.no_grad():
        want = trained.logits(ids, pos, cu)
        torch.testing.assert_close(fresh.logits(ids, pos, cu), want, rtol=0, atol=0)
        torch.testing.assert_close(resumed.eval().logits(ids, pos, cu), want, rtol=0, atol=0)
    assert fresh.lora_settings.r == 3 and fresh.lora_settings.alpha == 5
    assert all(p.requires_grad for _, p in trainable_parameters(fresh))


def test_load_adapter_mismatch_is_an_error(base_dir, tmp_path):
    cfg, base = base_dir
    save_adapter(lora_model(base, "qv"), tmp_path)
    other = load_model(base)
    apply_lora(other, LoraSettings(targets="qv", r=4))
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(load_model(base), tmp_path / "nothing")
