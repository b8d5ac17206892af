"""benchmarks/bench_weights.py's synthetic checkpoint writer and host-memory sampler, at a tiny size on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastft.model import load_model
from fastft.model.testing import packed_batch, tiny_config

# benchmarks/ is a folder of scripts, not an installed package: load the bench from its file.
_spec = importlib.util.spec_from_file_location(
    "bench_weights", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_weights.py")
bw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bw)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cfg(mxfp4=True):
    d = tiny_config(hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]).to_hf_dict()
    if mxfp4:
        d["quantization_config"] = {"quant_method": "mxfp4"}
    return d


def test_layout_is_transformers_state_dict():
    # with dense experts the hub layout is exactly GptOssForCausalLM's state dict (names and shapes)
    from fastft.model.config import ModelConfig
    from fastft.model.testing import hf_model

    cfg = _cfg(mxfp4=False)
    hf = {k: tuple(v.shape) for k, v in hf_model(ModelConfig.from_hf_dict(cfg)).state_dict().items()}
    assert {n: s for n, s, _ in bw.hub_layout(cfg, dense_experts=True)} == hf
    full = bw.hub_config()
    sizes = {n: s for n, s, _ in bw.hub_layout(full)}
    assert sizes["model.layers.23.mlp.experts.gate_up_proj_blocks"] == (32, 5760, 90, 16)
    assert sizes["model.layers.0.mlp.experts.down_proj_scales"] == (32, 2880, 90)
    total = sum(bw._nbytes(s, d) for _, s, d in bw.hub_layout(full))
    assert 13.7e9 < total < 13.8e9  # gpt-oss-20b's three hub shards hold 13.76 GB


@pytest.mark.parametrize("dense_experts", [False, True])
def test_written_checkpoint_reads_back_and_loads(tmp_path, dense_experts):
    cfg = _cfg(mxfp4=not dense_experts)
    total = bw.write_checkpoint(tmp_path, cfg, dense_experts=dense_experts, shards=3, seed=4)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    layout = bw.hub_layout(cfg, dense_experts)
    assert set(index["weight_map"]) == {n for n, _, _ in layout} and index["metadata"]["total_size"] == total
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and sum((tmp_path / f).stat().st_size for f in files) > total
    seeds = {name: 4 * 100_003 + i for i, (name, _, _) in enumerate(layout)}
    for name, shape, dtype in layout:
        with safe_open(tmp_path / index["weight_map"][name], framework="pt") as f:
            t = f.get_tensor(name)
        assert t.dtype == dtype and tuple(t.shape) == shape, name
        assert torch.equal(t, bw.synthetic_tensor(name, shape, dtype, seeds[name])), name

    model = load_model(tmp_path, experts="mxfp4", linears="nf4", offload_embedding=True)
    if not dense_experts:
        with safe_open(tmp_path / index["weight_map"]["model.layers.2.mlp.experts.down_proj_blocks"], "pt") as f:
            want = f.get_tensor("model.layers.2.mlp.experts.down_proj_blocks")
        assert torch.equal(model.model.layers[2].mlp.experts.down_proj_blocks, want)
    ids, pos, cu = packed_batch([5, 4], cfg["vocab_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model.logits(ids, pos, cu)).all()


def test_anon_sampler_sees_a_transient_allocation():
    sampler = bw.AnonPeak(period=0.001)
    base = sampler.peak
    sampler.start()
    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    t.add_(1)
    import time

    time.sleep(0.05)
    del t
    peak = sampler.stop()
    assert peak - base >= 48 * 1024  # KiB


@pytest.mark.parametrize("lm_head", ["int8", "bf16"])
def test_measure_load_runs_on_cpu(tmp_path, lm_head):
    bw.write_checkpoint(tmp_path, _cfg(), shards=2)
    m = bw.measure_load(tmp_path, device="cpu", lm_head=lm_head)
    for key in ("resident_gib", "load_peak_host_gib", "load_seconds", "experts_gib", "attention_gib", "lm_head_gib",
                "other_gib", "embedding_gib", "embedding_host_gib"):
        assert key in m and m[key] >= 0, key
    assert m["embedding_gib"] == 0 and m["load_seconds"] > 0


def test_full_size_lm_head_bytes():
    # what weights_memory reports for gpt-oss-20b's lm_head: 0.54 GiB int8 + scales, 1.08 GiB bf16
    from fastft.quant import Int8RowsTensor

    V, H = bw.hub_config()["vocab_size"], bw.hub_config()["hidden_size"]
    with torch.device("meta"):
        q = Int8RowsTensor(torch.empty(V, H, dtype=torch.int8), torch.empty(V))
    assert round(q.nbytes() / 2**30, 3) == 0.540 and round(V * H * 2 / 2**30, 3) == 1.079
