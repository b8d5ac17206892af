"""Loading GPT-OSS checkpoints: save_pretrained output, sharded hub-style MXFP4 checkpoints, and clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastft.model import CheckpointError, ModelLoadError, ModelNotFoundError, load_model, resolve_model_path
from fastft.model.gpt_oss import Experts
from fastft.model.testing import hf_model, packed_batch, tiny_config
from fastft.mxfp4 import MXFP4Tensor, dequantize_expert_param

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


def test_builtin_tiny_model_loads():
    try:
        path = resolve_model_path("tiny")
    except ModelNotFoundError:
        pytest.skip("fastft/assets/tiny not built")
    model = load_model(path)
    ids = torch.arange(12) % model.config.vocab_size
    loss = model(ids, torch.arange(12), torch.tensor([0, 12], dtype=torch.int32), ids)
    assert torch.isfinite(loss)


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
