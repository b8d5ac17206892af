"""GptOssForTraining with its lm_head held int8 (Int8RowsTensor): the same model as one whose dense lm_head is the
dequantised weight, through the torch reference loss and the fused kernel (Triton interpreter on CPU)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fastft.backends import get_backend
from fastft.model import GptOssForTraining, LoraSettings, apply_lora, count_parameters, save_adapter
from fastft.model.testing import packed_batch, tiny_config
from fastft.quant import Int8RowsTensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _models(backend=None, dtype=torch.float32, lora=True):
    """(int8 lm_head model, the same model with lm_head = the dequantised int8 weight, dense), same LoRA init."""
    cfg = tiny_config(hidden_size=64, intermediate_size=32, vocab_size=97)
    torch.manual_seed(0)
    q = GptOssForTraining.from_config(cfg, dtype=dtype, backend=backend)
    ref = GptOssForTraining.from_config(cfg, dtype=dtype, backend=backend)
    ref.load_state_dict(q.state_dict())
    q.quantize_lm_head("int8")
    with torch.no_grad():
        ref.lm_head.weight.copy_(q.lm_head.weight.dequantize(dtype))
    if lora:
        for m in (q, ref):
            torch.manual_seed(1)
            apply_lora(m, LoraSettings(targets="qv", r=4, alpha=8, dropout=0.0))
    return cfg, q, ref


def _batch(cfg):
    ids, pos, cu = packed_batch([7, 10, 4], cfg.vocab_size, generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:3] = -100  # a prompt
    return ids, pos, cu, labels


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_holder_replaces_the_parameter():
    cfg, q, ref = _models(lora=False)
    head = q.lm_head
    assert head.quantized and isinstance(head.weight, Int8RowsTensor) and head.weight.shape == (97, 64)
    assert "lm_head.weight" not in dict(q.named_parameters()) and "lm_head.weight" not in q.state_dict()
    assert count_parameters(q)[1] == count_parameters(ref)[1]  # counted by its logical size
    assert q.quantize_lm_head("int8").lm_head.weight is head.weight  # already int8: kept
    with pytest.raises(ValueError, match="'int8'"):
        ref.quantize_lm_head("int4")
    with pytest.raises(ValueError, match=r"quantized lm_head \(96, 64\)"):
        ref.lm_head.set_quantized(Int8RowsTensor.quantize(torch.randn(96, 64)))


def test_tied_embeddings_are_refused():
    cfg = tiny_config(hidden_size=64, intermediate_size=32, tie_word_embeddings=True)
    model = GptOssForTraining(cfg)  # (from_config's to_empty unties them)
    with pytest.raises(ValueError, match="tied"):
        model.quantize_lm_head("int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_torch_backend_equals_the_dequantised_model():
    cfg, q, ref = _models()
    batch = _batch(cfg)
    loss_q, grads_q = _loss_and_grads(q, batch)
    loss_r, grads_r = _loss_and_grads(ref, batch)
    assert loss_q.item() == loss_r.item()
    assert grads_q.keys() == grads_r.keys() and grads_q
    for n in grads_q:
        assert torch.equal(grads_q[n], grads_r[n]), n
    with torch.no_grad():
        logits = q.logits(*batch[:3])
        assert torch.equal(logits, ref.logits(*batch[:3]))
        h = q.hidden_states(*batch[:3])
        assert torch.equal(logits, F.linear(h, q.lm_head.weight.dequantize(h.dtype)))
        assert torch.equal(q.lm_head(h), logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_equals_the_dequantised_model(dtype, monkeypatch):
    from fastft.kernels import cross_entropy as ce

    # every op the torch reference except the loss: the fused kernel, in the Triton interpreter on CPU
    backend = dataclasses.replace(get_backend("torch"), loss=ce.fused_linear_cross_entropy)
    cfg, q, ref = _models(backend, dtype)
    batch = _batch(cfg)
    seen = []
    slabs = ce._forward_slabs
    monkeypatch.setattr(ce, "_forward_slabs", lambda h, w, *a, **k: seen.append(type(w)) or slabs(h, w, *a, **k))
    loss_q, grads_q = _loss_and_grads(q, batch)
    assert seen == [Int8RowsTensor]  # the holder reached the slabs path as it is
    loss_r, grads_r = _loss_and_grads(ref, batch)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert abs(loss_q.item() - loss_r.item()) <= tol * abs(loss_r.item())
    for n in grads_q:
        err = (grads_q[n].float() - grads_r[n].float()).norm() / grads_r[n].float().norm().clamp(min=1e-30)
        assert err <= (1e-4 if dtype == torch.float32 else 2e-2), n


def test_adapter_is_unaffected(tmp_path):
    cfg, q, ref = _models()
    save_adapter(q, tmp_path / "q")
    save_adapter(ref, tmp_path / "ref")
    keys = []
    for d in ("q", "ref"):
        with safe_open(tmp_path / d / "adapter_model.safetensors", "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1] and not any("lm_head" in k for k in keys[0])
