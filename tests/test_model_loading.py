"""Loading GPT-OSS checkpoints: save_pretrained output, sharded hub-style MXFP4 checkpoints, and clear errors."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from fastft.model import (CheckpointError, ModelLoadError, ModelNotFoundError, base_model_reference, load_model,
                          load_tokenizer, resolve_model_path)
from fastft.model.gpt_oss import Experts, GptOssForTraining, LoraLinear
from fastft.model.testing import hf_model, packed_batch, tiny_config
from fastft.mxfp4 import MXFP4Tensor, dequantize_expert_param
from fastft.quant import Int8RowsTensor, NF4Tensor, quantize_mxfp4, quantize_nf4

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def logits_of(model, cfg, lengths=(6, 9)):
    g = torch.Generator().manual_seed(5)
    ids, pos, cu = packed_batch(list(lengths), cfg.vocab_size, generator=g)
    with torch.no_grad():
        return model.logits(ids, pos, cu)


def hf_reference_logits(hf, cfg, lengths=(6, 9)):
    from fastft.model.testing import hf_packed_masks

    g = torch.Generator().manual_seed(5)
    ids, pos, cu = packed_batch(list(lengths), cfg.vocab_size, generator=g)
    with torch.no_grad():
        return hf(input_ids=ids[None], position_ids=pos[None],
                  attention_mask=hf_packed_masks(cu, cfg.sliding_window)).logits[0]


def write_sharded(tensors: dict, path, config: dict, n_shards=3, order=None):
    """Hub-style checkpoint: config.json, model.safetensors.index.json and n shards (round-robin over `order`)."""
    path.mkdir(parents=True, exist_ok=True)
    names = order or sorted(tensors)
    shards = [dict() for _ in range(n_shards)]
    for i, name in enumerate(names):
        shards[i % n_shards][name] = tensors[name].contiguous()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return path


def mxfp4_checkpoint(cfg, seed=0):
    """(hub-layout tensors with MXFP4 experts, the HF model holding their dequantised values)."""
    hf = hf_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, p in hf.state_dict().items():
        leaf = name.rpartition(".")[-1]
        if leaf not in Experts.WEIGHTS:
            tensors[name] = p.detach().clone()
            continue
        E, fan_in, fan_out = p.shape
        blocks = torch.randint(0, 256, (E, fan_out, fan_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(120, 126, (E, fan_out, fan_in // 32), generator=g, dtype=torch.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            p.copy_(dequantize_expert_param(blocks, scales))
    return tensors, hf


def hub_config(cfg):
    d = cfg.to_hf_dict()
    d["quantization_config"] = {"quant_method": "mxfp4"}
    return d


def test_save_pretrained_checkpoint(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.source_dir == str(tmp_path)
    want = hf_reference_logits(hf, cfg)
    got = logits_of(model, cfg)
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-5
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert bf16.model.norm.weight.dtype == torch.float32


def test_sharded_mxfp4_checkpoint(tmp_path):
    cfg = tiny_config(hidden_size=64, intermediate_size=32)  # MXFP4 needs in-features divisible by 32
    tensors, hf = mxfp4_checkpoint(cfg)
    # blocks and scales of one weight land in different shards: the loader must pair them across files
    write_sharded(tensors, tmp_path, hub_config(cfg), n_shards=3)
    model = load_model(tmp_path)
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0, msg=name)
    want = hf_reference_logits(hf, cfg)
    assert ((logits_of(model, cfg) - want).abs().max() / want.abs().max()) <= 1e-5

    q = load_model(tmp_path, keep_mxfp4=True)
    experts = q.model.layers[1].mlp.experts
    assert isinstance(experts.weight("down_proj"), MXFP4Tensor) and "down_proj" not in experts._parameters
    torch.testing.assert_close(logits_of(q, cfg), logits_of(model, cfg), rtol=0, atol=0)


def test_keep_mxfp4_needs_mxfp4_checkpoint(tmp_path):
    cfg = tiny_config()
    hf_model(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="MXFP4"):
        load_model(tmp_path, keep_mxfp4=True)


def test_missing_tensor_names_it(tmp_path):
    cfg = tiny_config(hidden_size=64, intermediate_size=32)
    tensors, _ = mxfp4_checkpoint(cfg)
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    write_sharded(tensors, tmp_path, hub_config(cfg))
    with pytest.raises(CheckpointError, match=r"index\.json: missing tensor\(s\) model\.layers\.1\.mlp\.experts\."
                                              r"down_proj_scales"):
        load_model(tmp_path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg)
    tensors = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(7)
    write_sharded(tensors, tmp_path, cfg.to_hf_dict(), n_shards=2)
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor "
                                              r"model\.layers\.0\.self_attn\.sinks has shape \[7\]"):
        load_model(tmp_path)


def test_truncated_shard_names_file(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg)
    write_sharded({k: v.detach().clone() for k, v in hf.state_dict().items()}, tmp_path, cfg.to_hf_dict(), 2)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_model(tmp_path)


def test_missing_shard_and_missing_files(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg)
    write_sharded({k: v.detach().clone() for k, v in hf.state_dict().items()}, tmp_path, cfg.to_hf_dict(), 2)
    os.remove(tmp_path / "model-00000-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard model-00000-of-00002.safetensors is listed but missing"):
        load_model(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_model(empty)


def test_unknown_path_and_uncached_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"'openai/gpt-oss-20b' is not a local directory and not in the "
                                             r"Hugging Face cache.*--model DIR.*--model tiny"):
        load_model("openai/gpt-oss-20b")


def test_cached_hub_id_resolves(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-oss" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--someone--tiny-oss" / "refs").mkdir()
    (cache / "models--someone--tiny-oss" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("someone/tiny-oss") == snap


def test_folder_without_config_json_says_so_before_the_tokenizer(tmp_path):
    """A folder that is not a model folder: the tokenizer, read first, must not be what the message is about."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path} has no config.json: --model expects a Hugging "
                                                        f"Face model folder")) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer (" not in str(e.value)


def test_base_model_reference_makes_local_folders_absolute(tmp_path, monkeypatch):
    """adapter_config.json's base_model_name_or_path: PEFT resolves it from its own working directory, so a local
    folder is stored absolute; a hub id stays as given; a built-in model is stored as its folder, which stock
    transformers loads (it knows no "tiny")."""
    (tmp_path / "models" / "gpt-oss").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert base_model_reference("gpt-oss") == str(tmp_path / "models" / "gpt-oss")
    assert base_model_reference("../models/gpt-oss/") == str(tmp_path / "models" / "gpt-oss")
    assert base_model_reference(tmp_path / "models" / "gpt-oss") == str(tmp_path / "models" / "gpt-oss")
    assert base_model_reference("openai/gpt-oss-20b") == "openai/gpt-oss-20b"  # no such folder here: a hub id
    from fastft.assets import BUILTIN_MODELS

    assert base_model_reference("tiny") == str(BUILTIN_MODELS["tiny"].resolve())
    (tmp_path / "models" / "tiny").mkdir()  # the built-in name wins over a folder of that name, as in loading
    assert base_model_reference("tiny") == str(BUILTIN_MODELS["tiny"].resolve())


def test_builtin_tiny_model_loads():
    try:
        path = resolve_model_path("tiny")
    except ModelNotFoundError:
        pytest.skip("fastft/assets/tiny not built")
    model = load_model(path)
    ids = torch.arange(12) % model.config.vocab_size
    loss = model(ids, torch.arange(12), torch.tensor([0, 12], dtype=torch.int32), ids)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------------
# 4-bit while streaming: experts MXFP4 / NF4, attention projections NF4, embedding offloaded

QCFG = dict(hidden_size=64, intermediate_size=32)  # MXFP4 needs expert in-features divisible by 32
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _experts_hold_nf4() -> bool:
    with torch.device("meta"):
        ex = Experts(tiny_config(**QCFG))
    try:
        ex.set_quantized("down_proj", NF4Tensor.__new__(NF4Tensor))
        return True
    except (AttributeError, TypeError):
        return False


needs_nf4_experts = pytest.mark.skipif(not _experts_hold_nf4(), reason="Experts.set_quantized holds only MXFP4 "
                                                                        "(fastft/model/gpt_oss.py)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A hub MXFP4 checkpoint and a dense bf16 one (save_pretrained names), both sharded so that the blocks and
    scales of one weight sit in different files."""
    cfg = tiny_config(**QCFG)
    root = tmp_path_factory.mktemp("ckpt")
    tensors, hf = mxfp4_checkpoint(cfg, seed=3)
    write_sharded(tensors, root / "hub", hub_config(cfg), n_shards=3)
    dense = {k: v.detach().to(torch.bfloat16) for k, v in hf.state_dict().items()}
    write_sharded(dense, root / "bf16", cfg.to_hf_dict(), n_shards=2)
    return cfg, root / "hub", root / "bf16", tensors


def quantised_after_loading(path, experts, linears):
    """The reference: load dense (fp32), then quantise the loaded weights the way the loader is asked to."""
    model = load_model(path)
    for module in model.modules():
        if isinstance(module, Experts) and experts != "dense":
            for w in Experts.WEIGHTS:
                dense = module.weight(w).detach()
                module.set_quantized(w, quantize_mxfp4(dense) if experts == "mxfp4" else quantize_nf4(dense))
        elif isinstance(module, LoraLinear) and linears == "nf4":
            module.set_quantized(quantize_nf4(module.weight.detach()))
    return model


def assert_same_4bit(a, b):
    if isinstance(a, MXFP4Tensor):
        assert isinstance(b, MXFP4Tensor) and torch.equal(a.blocks, b.blocks) and torch.equal(a.scales, b.scales)
    elif isinstance(a, NF4Tensor):
        assert isinstance(b, NF4Tensor) and torch.equal(a.data, b.data)
        assert torch.equal(a.absmax_fp32(), b.absmax_fp32()) and a.shape == b.shape and a.dtype == b.dtype
    else:
        assert torch.equal(a, b)


COMBOS = [("mxfp4", "dense"), ("mxfp4", "nf4"), ("dense", "nf4"), pytest.param("nf4", "nf4", marks=needs_nf4_experts)]


@pytest.mark.parametrize("source", ["hub", "bf16"])
@pytest.mark.parametrize("experts,linears", COMBOS)
def test_quantised_while_streaming_equals_quantised_after(checkpoints, source, experts, linears):
    cfg, hub, bf16, _ = checkpoints
    path = hub if source == "hub" else bf16
    got = load_model(path, experts=experts, linears=linears)
    want = quantised_after_loading(path, experts, linears)
    params = dict(got.named_parameters())
    for i, layer in enumerate(got.model.layers):
        ref = want.model.layers[i]
        for w in Experts.WEIGHTS:
            assert (f"model.layers.{i}.mlp.experts.{w}" in params) == (experts == "dense")
            if not (source == "hub" and experts == "mxfp4"):  # hub bytes: checked bit-exact below
                assert_same_4bit(layer.mlp.experts.weight(w), ref.mlp.experts.weight(w))
        for p in ATTN:
            assert (f"model.layers.{i}.self_attn.{p}.weight" in params) == (linears == "dense")
            assert_same_4bit(getattr(layer.self_attn, p).weight, getattr(ref.self_attn, p).weight)
    assert torch.equal(logits_of(got, cfg), logits_of(want, cfg))


@pytest.mark.parametrize("linears", ["dense", "nf4"])
def test_hub_mxfp4_kept_bit_exact(checkpoints, linears):
    cfg, hub, _, tensors = checkpoints
    for kw in (dict(experts="mxfp4"), dict(keep_mxfp4=True)):
        model = load_model(hub, linears=linears, **kw)
        for name, buf in model.named_buffers():
            if name.endswith(("_blocks", "_scales")):
                assert buf.dtype == torch.uint8 and torch.equal(buf, tensors[name]), name
        assert not any(n.endswith(Experts.WEIGHTS) for n, _ in model.named_parameters())


def test_no_dense_placeholder_for_4bit_weights(checkpoints):
    # the swap happens on the meta model, before to_empty allocates anything
    from fastft.model.loading import _place_4bit, weight_map

    cfg, _, bf16, _ = checkpoints
    with torch.device("meta"):
        model = GptOssForTraining(cfg)
    _place_4bit(model, weight_map(bf16), "mxfp4", "nf4", require_hub=False)
    dense = {n for n, _ in model.named_parameters()}
    assert not {n for n in dense if n.endswith(("experts.gate_up_proj", "experts.down_proj", "proj.weight"))}
    assert "model.embed_tokens.weight" in dense and "lm_head.weight" in dense


def test_offload_embedding_on_load(checkpoints):
    cfg, hub, _, _ = checkpoints
    model = load_model(hub, experts="mxfp4", linears="nf4", offload_embedding=True)
    assert model._host_embedding is not None and "model.embed_tokens.weight" not in dict(model.named_parameters())
    torch.testing.assert_close(model._host_embedding, load_model(hub).model.embed_tokens.weight.detach(),
                               rtol=0, atol=0)
    assert torch.equal(logits_of(model, cfg), logits_of(load_model(hub, experts="mxfp4", linears="nf4"), cfg))


@pytest.mark.parametrize("source,dtype", [("hub", torch.float32), ("bf16", torch.bfloat16), ("bf16", torch.float32)])
def test_int8_lm_head_while_streaming_equals_quantised_after(checkpoints, source, dtype):
    cfg, hub, bf16, _ = checkpoints
    path = hub if source == "hub" else bf16
    got = load_model(path, dtype=dtype, lm_head="int8")
    want = load_model(path, dtype=dtype)
    dense = want.lm_head.weight.detach().float()
    want.quantize_lm_head("int8")
    q, ref = got.lm_head.weight, want.lm_head.weight
    assert isinstance(q, Int8RowsTensor) and q.dtype == dtype and q.shape == (cfg.vocab_size, cfg.hidden_size)
    assert torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
    assert ((q.dequantize() - dense).abs() <= q.scale.unsqueeze(1) * (0.5 + 1e-4)).all()
    assert "lm_head.weight" not in dict(got.named_parameters())
    assert torch.equal(logits_of(got, cfg), logits_of(want, cfg))


def test_int8_lm_head_with_the_trainer_layout(checkpoints):
    from fastft.quant import weight_bytes

    cfg, hub, _, _ = checkpoints
    model = load_model(hub, experts="mxfp4", linears="nf4", lm_head="int8", offload_embedding=True)
    dense = load_model(hub, experts="mxfp4", linears="nf4", offload_embedding=True)
    assert weight_bytes(model)["lm_head"] == cfg.vocab_size * (cfg.hidden_size + 4)
    assert weight_bytes(dense)["lm_head"] == cfg.vocab_size * cfg.hidden_size * 4  # fp32 on CPU
    dense.quantize_lm_head("int8")
    assert torch.equal(logits_of(model, cfg), logits_of(dense, cfg))
    assert torch.equal(model.lm_head.weight.data, dense.lm_head.weight.data)


def test_int8_lm_head_bad_arguments(checkpoints):
    from fastft.model.loading import _place_lm_head

    _, hub, _, _ = checkpoints
    with pytest.raises(ValueError, match="lm_head must be one of"):
        load_model(hub, lm_head="int4")
    with torch.device("meta"):
        tied = GptOssForTraining(tiny_config(**QCFG, tie_word_embeddings=True))
    with pytest.raises(ModelLoadError, match="ties it to the input embedding"):
        _place_lm_head(tied, "int8")
    _place_lm_head(tied, "bf16")  # nothing to do
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_bad_arguments(checkpoints):
    _, hub, bf16, _ = checkpoints
    with pytest.raises(ValueError, match="contradicts"):
        load_model(hub, keep_mxfp4=True, experts="nf4")
    with pytest.raises(ValueError, match="experts must be one of"):
        load_model(hub, experts="int8")
    with pytest.raises(ValueError, match="linears must be|one of"):
        load_model(hub, linears="mxfp4")
    with pytest.raises(CheckpointError, match="MXFP4"):
        load_model(bf16, keep_mxfp4=True)
    with pytest.raises(ModelLoadError, match="divisible by 32"):
        small = tiny_config()  # intermediate 24: down_proj in-features are not whole MXFP4 blocks
        with torch.device("meta"):
            from fastft.model.loading import _place_4bit
            _place_4bit(GptOssForTraining(small), {}, "mxfp4", "dense", require_hub=False)


def _dense_tensors(cfg, seed=0):
    return {k: v.detach().to(torch.bfloat16) for k, v in hf_model(cfg, seed).state_dict().items()}


@pytest.mark.parametrize("experts,linears", [("mxfp4", "nf4"), pytest.param("nf4", "dense", marks=needs_nf4_experts)])
def test_errors_on_the_quantising_paths(tmp_path, experts, linears):
    cfg = tiny_config(**QCFG)
    kw = dict(experts=experts, linears=linears)
    # a dense expert stack of the wrong shape
    t = _dense_tensors(cfg)
    t["model.layers.1.mlp.experts.down_proj"] = torch.zeros(4, 32, 60, dtype=torch.bfloat16)
    write_sharded(t, tmp_path / "shape", cfg.to_hf_dict(), n_shards=2)
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor "
                                              r"model\.layers\.1\.mlp\.experts\.down_proj has shape \[4, 32, 60\]"):
        load_model(tmp_path / "shape", **kw)
    # a missing attention projection, and a projection stored as integers
    t = _dense_tensors(cfg)
    del t["model.layers.0.self_attn.k_proj.weight"]
    write_sharded(t, tmp_path / "missing", cfg.to_hf_dict(), n_shards=2)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(tmp_path / "missing", **kw)
    t = _dense_tensors(cfg)
    t["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(4, 64, 64, dtype=torch.int8)
    write_sharded(t, tmp_path / "int", cfg.to_hf_dict(), n_shards=2)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.experts\.gate_up_proj is torch\.int8"):
        load_model(tmp_path / "int", **kw)
    # a truncated shard
    write_sharded(_dense_tensors(cfg), tmp_path / "trunc", cfg.to_hf_dict(), n_shards=2)
    shard = tmp_path / "trunc" / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_model(tmp_path / "trunc", **kw)


def test_hub_scales_of_wrong_dtype_named(tmp_path):
    cfg = tiny_config(**QCFG)
    tensors, _ = mxfp4_checkpoint(cfg)
    tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] = tensors[
        "model.layers.0.mlp.experts.gate_up_proj_scales"].to(torch.int16)
    write_sharded(tensors, tmp_path, hub_config(cfg))
    for kw in (dict(experts="mxfp4"), dict(experts="dense")):
        with pytest.raises(CheckpointError, match=r"gate_up_proj_scales is torch\.int16, expected torch\.uint8"):
            load_model(tmp_path, **kw)


@pytest.mark.gpu
def test_mxfp4_load_on_cuda_bf16(tmp_path):
    cfg = tiny_config(hidden_size=64, intermediate_size=64)
    tensors, hf = mxfp4_checkpoint(cfg)
    write_sharded(tensors, tmp_path, hub_config(cfg), n_shards=2)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    for name, p in hf.state_dict().items():
        got = model.state_dict()[name]
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.float().cpu(), p.to(got.dtype).float(), rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["mxfp4", pytest.param("nf4", marks=needs_nf4_experts)])
@pytest.mark.parametrize("source", ["hub", "bf16"])
def test_trainer_layout_on_cuda(checkpoints, source, experts):
    """What the trainer loads on CUDA: MXFP4 experts, NF4 attention (bnb's CUDA quantiser), embedding on the host;
    equal to loading dense and quantising on the same device, and the triton backend runs it."""
    from fastft.backends import get_backend

    cfg, hub, bf16, tensors = checkpoints
    path = hub if source == "hub" else bf16
    got = load_model(path, dtype=torch.bfloat16, device="cuda", experts=experts, linears="nf4",
                     offload_embedding=True)
    want = load_model(path, dtype=torch.bfloat16, device="cuda")
    quant = quantize_mxfp4 if experts == "mxfp4" else quantize_nf4
    for module in want.modules():
        if isinstance(module, Experts):
            for w in Experts.WEIGHTS:
                module.set_quantized(w, quant(module.weight(w).detach()))
        elif isinstance(module, LoraLinear):
            module.set_quantized(quantize_nf4(module.weight.detach()))
    for i, layer in enumerate(got.model.layers):
        for w in Experts.WEIGHTS:
            q = layer.mlp.experts.weight(w)
            assert q.device.type == "cuda"
            if source == "hub" and experts == "mxfp4":
                assert torch.equal(q.blocks.cpu(), tensors[f"model.layers.{i}.mlp.experts.{w}_blocks"])
            else:
                assert_same_4bit(q, want.model.layers[i].mlp.experts.weight(w))
        for p in ATTN:
            q = getattr(layer.self_attn, p).weight
            assert isinstance(q, NF4Tensor) and q.device.type == "cuda"
            assert_same_4bit(q, getattr(want.model.layers[i].self_attn, p).weight)
    assert got._host_embedding.device.type == "cpu" and got._host_embedding.is_pinned()
    g = torch.Generator().manual_seed(5)
    ids, pos, cu = packed_batch([6, 9], cfg.vocab_size, device="cuda", generator=g)
    with torch.no_grad():
        ref = want.logits(ids, pos, cu).float()
        # same 4-bit weights, same ops: only the order of CUDA atomics may differ
        assert ((got.logits(ids, pos, cu).float() - ref).norm() / ref.norm()) < 5e-3
        got.set_backend(get_backend("triton", "cuda"))  # the kernels take the loaded holders as they are
        fast = got.logits(ids, pos, cu)
    assert fast.shape == ref.shape and torch.isfinite(fast).all()


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["hub", "bf16"])
def test_int8_lm_head_load_on_cuda(checkpoints, source):
    """lm_head="int8" on CUDA (row chunks streamed to the device): the codes of quantising the loaded bf16 weight on
    the same device, and the triton backend's fused loss takes the holder."""
    from fastft.backends import get_backend

    cfg, hub, bf16, _ = checkpoints
    path = hub if source == "hub" else bf16
    got = load_model(path, dtype=torch.bfloat16, device="cuda", experts="mxfp4", linears="nf4", lm_head="int8",
                     offload_embedding=True)
    want = load_model(path, dtype=torch.bfloat16, device="cuda")
    ref = Int8RowsTensor.quantize(want.lm_head.weight.detach())
    q = got.lm_head.weight
    assert q.device.type == "cuda" and torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
    g = torch.Generator().manual_seed(5)
    ids, pos, cu = packed_batch([6, 9], cfg.vocab_size, device="cuda", generator=g)
    with torch.no_grad():
        ref_loss = got(ids, pos, cu, ids)  # torch backend: the reference loss dequantises the holder
        got.set_backend(get_backend("triton", "cuda"))
        loss = got(ids, pos, cu, ids)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item())
