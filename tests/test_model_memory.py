"""Memory placements of the model: the input embedding in host memory, 4-bit attention projections."""

import pytest
import torch

from fastft.model import GptOssForTraining, LoraSettings, apply_lora, count_parameters
from fastft.model.testing import packed_batch, tiny_config
from fastft.quant import quantize_mxfp4


def test_offloaded_embedding_same_loss_and_grads():
    cfg = tiny_config()
    torch.manual_seed(0)
    a = GptOssForTraining.from_config(cfg)
    b = GptOssForTraining.from_config(cfg)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        apply_lora(m, LoraSettings(targets="qv", r=2, dropout=0.0))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    _, total = count_parameters(b)
    b.offload_embedding()
    assert "model.embed_tokens.weight" not in dict(b.named_parameters())
    assert count_parameters(b)[1] == total
    ids, pos, cu = packed_batch([5, 1, 9], cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    la, lb = a(ids, pos, cu, ids), b(ids, pos, cu, ids)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    ga = {n: p.grad for n, p in a.named_parameters() if p.requires_grad}
    gb = {n: p.grad for n, p in b.named_parameters() if p.requires_grad}
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    b.to("cpu")  # a module move never brings it back as a parameter
    assert b._host_embedding is not None


def test_offload_refuses_trainable_embedding():
    model = GptOssForTraining.from_config(tiny_config())
    with pytest.raises(ValueError, match="frozen"):
        model.offload_embedding()


def test_quantized_projection_matches_its_dequantized_weight():
    cfg = tiny_config()
    model = GptOssForTraining.from_config(cfg)
    proj = model.model.layers[0].self_attn.q_proj
    q = quantize_mxfp4(proj.weight.detach())
    x = torch.randn(7, cfg.hidden_size)
    with torch.no_grad():
        proj.weight.copy_(q.dequantize(torch.float32))
        want = proj(x)
    _, total = count_parameters(model)
    proj.set_quantized(q)
    assert proj.quantized and "weight" not in dict(proj.named_parameters())
    assert count_parameters(model)[1] == total
    torch.testing.assert_close(proj(x), want)
    with pytest.raises(ValueError):
        model.model.layers[0].self_attn.k_proj.set_quantized(q)
