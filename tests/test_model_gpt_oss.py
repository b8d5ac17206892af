"""fastft's GPT-OSS against transformers' GptOssForCausalLM (+ PEFT) on small random configs, fp32."""

import pytest
import torch
import torch.nn.functional as F

from fastft.model import GptOssForTraining, LoraSettings, ModelConfig, apply_lora, count_parameters
from fastft.model.adapter import peft_state, save_adapter
from fastft.model.config import rope_frequencies
from fastft.model.gpt_oss import shift_labels
from fastft.model.lora import trainable_parameters
from fastft.model.testing import hf_model, hf_packed_masks, packed_batch, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def pair(cfg, seed=0):
    hf = hf_model(cfg, seed)
    ours = GptOssForTraining(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


def hf_labels(input_ids, cu):
    """Labels as a packing collator writes them: each document's first token is -100."""
    labels = input_ids.clone()
    labels[cu[:-1].long()] = -100
    return labels


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "mscale": 2.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "original_max_position_embeddings": 32},
    {"rope_type": "default"},
])
def test_rope_matches_hf(rope):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    cfg = tiny_config(rope=rope, head_dim=64)
    ref = GptOssRotaryEmbedding(GptOssConfig(**cfg.to_hf_dict()))
    inv_freq, scaling = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, ref.inv_freq, rtol=0, atol=0)
    assert scaling == ref.attention_scaling


def test_hub_config_spelling():
    """The hub's config.json spells rope as rope_scaling + rope_theta (transformers 4.55)."""
    from transformers import GptOssConfig

    hub = {"model_type": "gpt_oss", "hidden_size": 64, "head_dim": 64, "num_hidden_layers": 2, "rope_theta": 150000,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings":
                            4096, "rope_type": "yarn", "truncate": False}, "experts_per_token": 4,
           "quantization_config": {"quant_method": "mxfp4"}, "swiglu_limit": 7.0}
    cfg = ModelConfig.from_hf_dict(hub)
    assert cfg.quant_method == "mxfp4" and cfg.rope_theta == 150000.0
    hf = GptOssConfig(**{k: v for k, v in hub.items() if k != "quantization_config"})
    assert {**cfg.rope, "rope_theta": cfg.rope_theta} == hf.rope_parameters
    assert cfg.layer_types == hf.layer_types


@pytest.mark.parametrize("lengths", [[11], [5, 1, 9, 4]], ids=["single", "packed"])
def test_logits_match_hf(lengths):
    cfg = tiny_config()
    hf, ours = pair(cfg)
    gates = []
    for layer in hf.model.layers:  # record the routed experts' pre-activations to prove the clamps fire
        def hook(mod, args):
            x, idx = args[0], args[1]
            for e in idx.unique().tolist():
                tok = (idx == e).any(-1)
                gates.append(x[tok] @ mod.gate_up_proj[e] + mod.gate_up_proj_bias[e])
        layer.mlp.experts.register_forward_pre_hook(hook)
    ids, pos, cu = packed_batch(lengths, cfg.vocab_size)
    with torch.no_grad():
        got = ours.logits(ids, pos, cu)
        want = hf(input_ids=ids[None], position_ids=pos[None],
                  attention_mask=hf_packed_masks(cu, cfg.sliding_window)).logits[0]
    assert rel_err(got, want) <= 1e-5
    gu = torch.cat(gates)
    assert (gu[:, ::2] > 7).any() and (gu[:, 1::2].abs() > 7).any() and (gu[:, ::2] < 7).any()
    # the YaRN factor matters: without it the logits move
    ours.attention_scaling = 1.0
    with torch.no_grad():
        assert rel_err(ours.logits(ids, pos, cu), want) > 1e-3


def test_packed_equals_separate_documents():
    cfg = tiny_config()
    _, ours = pair(cfg)
    lengths = [6, 2, 7]
    ids, pos, cu = packed_batch(lengths, cfg.vocab_size)
    with torch.no_grad():
        packed = ours.logits(ids, pos, cu)
        parts = [ours.logits(ids[a:b], pos[a:b], torch.tensor([0, b - a], dtype=torch.int32))
                 for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(packed, torch.cat(parts), rtol=1e-5, atol=1e-5)


def test_shift_labels_ignores_document_ends():
    labels = torch.arange(10, 20)
    cu = torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32)
    assert shift_labels(labels, cu).tolist() == [11, 12, -100, 14, 15, 16, -100, 18, 19, -100]


def test_loss_is_shifted_cross_entropy():
    cfg = tiny_config()
    _, ours = pair(cfg)
    ids, pos, cu = packed_batch([4, 6], cfg.vocab_size)
    labels = ids.clone()
    labels[2] = -100
    loss = ours(ids, pos, cu, labels)
    logits = ours.logits(ids, pos, cu)
    keep = torch.tensor([0, 2, 4, 5, 6, 7, 8])  # targets labels[i+1]: not 1 (label -100), not 3/9 (document ends)
    want = F.cross_entropy(logits[keep], labels[keep + 1])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert loss.dtype == torch.float32


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_lora_gradients_match_peft(targets, tmp_path):
    from peft import PeftModel

    cfg = tiny_config()
    hf, ours = pair(cfg)
    apply_lora(ours, LoraSettings(targets=targets, r=3, alpha=7, dropout=0.0))
    _randomize_lora(ours)
    save_adapter(ours, tmp_path)
    peft = PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    ids, pos, cu = packed_batch([6, 9, 3], cfg.vocab_size)
    labels = hf_labels(ids, cu)
    ours(ids, pos, cu, labels).backward()
    want_loss = peft(input_ids=ids[None], position_ids=pos[None], labels=labels[None],
                     attention_mask=hf_packed_masks(cu, cfg.sliding_window)).loss
    want_loss.backward()
    theirs = {n.replace(".default", ""): p for n, p in peft.named_parameters() if p.requires_grad}
    mine = peft_state(ours)
    assert set(theirs) == set(mine)
    for name, p in mine.items():
        assert rel_err(p.grad, theirs[name].grad) <= 1e-5, name


def test_lora_freezes_base_and_counts():
    cfg = tiny_config()
    model = GptOssForTraining.from_config(cfg)
    _, total_before = count_parameters(model)
    apply_lora(model, LoraSettings(targets="all", r=2))
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all("lora_" in n for n in names)
    L, H, E, I, r = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, 2
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = r * (H + q) + 2 * r * (H + kv) + r * (q + H) + r * E * (H + 2 * I) + r * E * (I + H)
    trainable, total = count_parameters(model)
    assert trainable == L * per_layer and total == total_before + trainable
    with pytest.raises(RuntimeError):
        apply_lora(model, LoraSettings())
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraSettings(targets="q_proj,router")


@pytest.mark.parametrize("kernels,targets", [("torch", "attn"), ("triton", "all")])
def test_gradient_checkpointing_same_gradients(kernels, targets):
    """Also with the Triton MoE, whose checkpoint recompute skips the block's output (backends.output_unused)."""
    from fastft.backends import get_backend

    cfg = tiny_config()
    _, ours = pair(cfg)
    ours.set_backend(get_backend(kernels))
    apply_lora(ours, LoraSettings(targets=targets, r=2, dropout=0.3 if targets == "attn" else 0.0))
    _randomize_lora(ours)
    ours.train()
    ids, pos, cu = packed_batch([5, 8], cfg.vocab_size)
    grads = []
    for ckpt in (False, True):
        ours.enable_gradient_checkpointing(ckpt)
        ours.zero_grad()
        torch.manual_seed(3)  # same dropout masks; checkpoint replays the RNG state on recompute
        ours(ids, pos, cu, hf_labels(ids, cu)).backward()
        grads.append([p.grad.clone() for _, p in trainable_parameters(ours)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_only_in_training():
    cfg = tiny_config()
    _, ours = pair(cfg)
    apply_lora(ours, LoraSettings(targets="qv", r=2, dropout=0.5))
    _randomize_lora(ours)
    ids, pos, cu = packed_batch([9], cfg.vocab_size)
    with torch.no_grad():
        a, b = ours.logits(ids, pos, cu), ours.logits(ids, pos, cu)
        ours.train()
        c = ours.logits(ids, pos, cu)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_from_config_dtypes_and_init():
    cfg = tiny_config(num_hidden_layers=3)
    model = GptOssForTraining.from_config(cfg, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith("norm.weight") else torch.bfloat16), name
        assert p.device.type == "cpu" and torch.isfinite(p).all()
    assert (model.model.norm.weight == 1).all() and (model.model.layers[0].self_attn.q_proj.bias == 0).all()
    assert 0.01 < model.lm_head.weight.float().std() < 0.03
    ids, pos, cu = packed_batch([4, 3], cfg.vocab_size)
    loss = model(ids, pos, cu, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_bf16_cuda_tracks_fp32(kernels):
    """On the GPU with bf16 weights: logits track the fp32 CPU model (mean error: a few tokens may route to other
    experts in bf16), and LoRA backward with checkpointing gives finite gradients everywhere."""
    from fastft.backends import get_backend

    cfg = tiny_config(hidden_size=64, intermediate_size=64, num_hidden_layers=4, head_dim=64, sliding_window=5)
    hf, ref = pair(cfg)
    gpu = GptOssForTraining(cfg, get_backend(kernels, "cuda"))
    gpu.load_state_dict(hf.state_dict())
    gpu.to_dtype(torch.bfloat16).to("cuda").eval()
    ids, pos, cu = packed_batch([37, 5, 64], cfg.vocab_size)
    with torch.no_grad():
        want = ref.logits(ids, pos, cu)
        got = gpu.logits(ids.cuda(), pos.cuda(), cu.cuda()).float().cpu()
    assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.08
    apply_lora(gpu, LoraSettings(targets="all", r=4))
    _randomize_lora(gpu)
    gpu.train()
    gpu.enable_gradient_checkpointing(True)
    loss = gpu(ids.cuda(), pos.cuda(), cu.cuda(), hf_labels(ids, cu).cuda())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable_parameters(gpu))


def test_full_size_parameter_count():
    """gpt-oss-20b's default config builds the published 20,914,757,184 parameters (on the meta device)."""
    with torch.device("meta"):
        model = GptOssForTraining(ModelConfig())
    assert count_parameters(model)[1] == 20_914_757_184
    apply_lora(model, LoraSettings(targets="qv", r=16))
    assert count_parameters(model)[0] == 24 * 16 * ((2880 + 4096) + (2880 + 512))


@pytest.mark.gpu
def test_full_size_random_init_trains_on_cuda():
    """gpt-oss-20b at full size (random init, bf16, ~42 GB): loss near ln(V) and finite LoRA gradients."""
    from fastft.backends import get_backend

    cfg = ModelConfig()
    model = GptOssForTraining.from_config(cfg, torch.bfloat16, "cuda", get_backend("auto", "cuda"))
    apply_lora(model, LoraSettings(targets="all", r=16))
    model.train()
    model.enable_gradient_checkpointing(True)
    ids, pos, cu = packed_batch([300, 212], cfg.vocab_size, device="cuda")
    loss = model(ids, pos, cu, ids)
    assert 11.0 < loss.item() < 14.5
    loss.backward()
    grads = [p.grad for _, p in trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
