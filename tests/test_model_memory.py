"""Memory placements of the model: the input embedding in host memory, 4-bit attention projections."""

import pytest
import torch

from fastft.model import GptOssForTraining, LoraSettings, apply_lora, count_parameters
from fastft.kernels.rms_norm import RMSNormReferenceFunction as _RMSNormFunction
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


# ---------------------------------------------------------------------------------------------------------------------
# Long-context memory: lean RMSNorm, chunked MoE, checkpointed layer inputs offloaded to host memory.

def hf_rmsnorm(x, weight, eps):
    """The formula RMSNorm replaces (HF's GptOssRMSNorm), computed in fp64 when x is fp64."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("shape", [(37, 33), (3, 5, 33), (1, 7)])
def test_rmsnorm_matches_autograd_of_hf_formula(monkeypatch, dtype, weight_grad, shape):
    monkeypatch.setattr(_RMSNormFunction, "BLOCK_ELEMS", 100)  # 3 rows of 33 per block: the last block is partial
    eps = 1e-5
    x = (3 * torch.randn(shape, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (1 + 0.3 * torch.randn(shape[-1], dtype=w_dtype)).requires_grad_(weight_grad)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _RMSNormFunction.apply(x, w, eps)
    # only x (its own dtype), the weight and rstd [rows] are kept for backward
    rows = x.numel() // shape[-1]
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [
        (dtype, shape), (w_dtype, (shape[-1],)), (torch.promote_types(dtype, torch.float32), (rows,))]
    y_ref = hf_rmsnorm(x, w, eps)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    gx, *gw = torch.autograd.grad(y, [x, w] if weight_grad else [x], dy)
    gx_ref, *gw_ref = torch.autograd.grad(y_ref, [x, w] if weight_grad else [x], dy)
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    torch.testing.assert_close(gx, gx_ref, **tol)
    if weight_grad:
        assert gw[0].dtype == w_dtype
        torch.testing.assert_close(gw[0], gw_ref[0], **tol)


def _lora_model(cfg, state, targets="all", dropout=0.0, checkpointing=False, offload=False, chunk=None):
    model = GptOssForTraining.from_config(cfg)
    model.load_state_dict(state)
    apply_lora(model, LoraSettings(targets=targets, r=2, dropout=dropout))
    with torch.no_grad():  # LoRA B starts at zero: give every adapter a non-zero gradient path
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    model.enable_gradient_checkpointing(checkpointing, offload=offload)
    model.moe_chunk_tokens = chunk
    if offload:
        model._activation_offload.page_bytes = 7 * cfg.hidden_size * 4  # 7-row pages: every input spans pages
    return model.train()


def _step(model, batch, seed=3):
    torch.manual_seed(seed)  # same dropout masks in every model
    loss = model(*batch, batch[0])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    torch.manual_seed(0)
    state = GptOssForTraining.from_config(cfg).state_dict()
    batch = packed_batch([5, 1, 9, 8], cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    return cfg, state, batch


def _assert_grads(got, want, exact):
    assert got.keys() == want.keys() and got
    for n in want:
        if exact:
            assert torch.equal(got[n], want[n]), n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_checkpointing_equals_plain_checkpointing(tiny, dropout):
    cfg, state, batch = tiny
    targets = "qv" if dropout else "all"
    plain = _lora_model(cfg, state, targets, dropout, checkpointing=True)
    off = _lora_model(cfg, state, targets, dropout, checkpointing=True, offload=True)
    assert off.offload_activations and not plain.offload_activations
    for _ in range(2):  # a second step starts a fresh chain of layer inputs and accumulates into .grad
        want, got = _step(plain, batch), _step(off, batch)
        assert torch.equal(got[0], want[0])
        _assert_grads(got[1], want[1], exact=True)
    # every layer input went to host memory, in pages, chained for prefetch
    torch.manual_seed(3)
    loss = off(*batch, batch[0])
    chain, handle = [], off._activation_offload._last()
    while handle is not None:
        chain.append(handle)
        handle = handle.prev()
    T = batch[0].numel()
    assert len(chain) == cfg.num_hidden_layers
    assert all(h.shape == (T, cfg.hidden_size) and len(h.pages) == -(-T // 7) for h in chain)
    loss.backward()
    del loss, handle, chain
    assert off._activation_offload._last() is None  # the graph owned the handles and their host pages
    # without grad (evaluation) nothing is checkpointed or offloaded
    with torch.no_grad():
        torch.manual_seed(4)
        got = off.logits(*batch)
        torch.manual_seed(4)
        assert torch.equal(got, plain.logits(*batch))


def test_offload_keeps_no_reference_to_layer_inputs(tiny):
    """After forward, nothing but the host copies holds a layer input (autograd keeps the pack hook alive with the
    saved tensor, so a hook that closed over the input would keep it on the device)."""
    import gc
    import weakref

    cfg, state, batch = tiny
    model = _lora_model(cfg, state, "qv", 0.0, checkpointing=True, offload=True)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
             for layer in model.model.layers]
    loss = model(*batch, batch[0])
    for h in hooks:
        h.remove()
    gc.collect()
    assert len(inputs) == cfg.num_hidden_layers and all(ref() is None for ref in inputs)
    loss.backward()


def test_chunked_moe_equals_unchunked(tiny):
    cfg, state, batch = tiny
    want = _step(_lora_model(cfg, state), batch)
    model = _lora_model(cfg, state, chunk=4)  # 23 tokens: chunks of 4, 4, 4, 4, 4, 3
    assert all(layer.mlp.chunk_tokens == 4 for layer in model.model.layers)
    got = _step(model, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    _assert_grads(got[1], want[1], exact=False)
    with pytest.raises(ValueError):
        model.moe_chunk_tokens = 0
    with pytest.raises(ValueError, match="checkpointing"):
        model.enable_gradient_checkpointing(False, offload=True)


def test_offload_chunking_and_checkpointing_together_equal_plain(tiny):
    cfg, state, batch = tiny
    want = _step(_lora_model(cfg, state), batch)
    got = _step(_lora_model(cfg, state, checkpointing=True, offload=True, chunk=5), batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    _assert_grads(got[1], want[1], exact=False)


@pytest.mark.gpu
def test_offload_frees_layer_inputs_and_keeps_grads_gpu():
    """Streams, pinned pages and prefetch on CUDA: same loss and grads as plain checkpointing, and after forward the
    GPU no longer holds the layers' inputs (4 x 8192 x 64 fp32 = 8 MiB with plain checkpointing)."""
    cfg = tiny_config(hidden_size=64, num_hidden_layers=4)
    torch.manual_seed(0)
    state = GptOssForTraining.from_config(cfg).state_dict()
    batch = packed_batch([3000, 1, 5191], cfg.vocab_size, device="cuda", generator=torch.Generator().manual_seed(1))
    results = {}
    for offload in (False, True):
        model = _lora_model(cfg, state, "all", 0.0, checkpointing=True, offload=offload).cuda()
        if offload:
            model._activation_offload.page_bytes = 1 << 20  # several pages per input
        # a warm-up step first: what the kernels build on first use (tables, workspaces) then exists before `before`
        # (after other GPU tests in the process, a first-use buffer of ~4.7 MB landed inside the measured forward)
        model(*batch, batch[0]).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(*batch, batch[0])
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        results[offload] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, held
    (loss_a, grads_a, held_a), (loss_b, grads_b, held_b) = results[False], results[True]
    inputs = cfg.num_hidden_layers * batch[0].numel() * cfg.hidden_size * 4
    assert held_a - held_b >= 0.9 * inputs, (held_a, held_b, inputs)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    _assert_grads(grads_b, grads_a, exact=False)


def _full_width_model(layers: int, device="cuda", **overrides):
    """gpt-oss-20b's shapes with `layers` decoder layers, random weights: MXFP4 experts, bf16 attention and lm_head,
    embedding in host memory, LoRA r=16 on q/v with dropout 0.1 (the context bench's W1-qv), Triton kernels."""
    import json
    from pathlib import Path

    from fastft.backends import get_backend
    from fastft.model.config import ModelConfig
    from fastft.model.testing import mxfp4_expert_placeholders

    hf = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/configs/gpt-oss-20b.json").read_text())
    hf["num_hidden_layers"], hf["layer_types"] = layers, hf["layer_types"][:layers]
    cfg = ModelConfig.from_hf_dict({**hf, **overrides})
    with torch.device("meta"):
        model = GptOssForTraining(cfg, get_backend("auto", device))
        mxfp4_expert_placeholders(model)  # 4-bit placeholders: the bf16 experts never exist in full
    model.to_dtype(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for name in ex.WEIGHTS:
                E, fan_in, fan_out = ex.weight_shape(name)
                q = quantize_mxfp4(torch.randn(E, fan_in, fan_out, device=device, dtype=torch.bfloat16) * 0.02)
                getattr(ex, f"{name}_blocks").copy_(q.blocks)
                getattr(ex, f"{name}_scales").copy_(q.scales)
    apply_lora(model, LoraSettings(targets="qv", r=16, alpha=32, dropout=0.1, dtype=torch.bfloat16))
    with torch.no_grad():  # B = 0 would leave every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.offload_embedding().train(), cfg


def _measured_step(model, opt, batch):
    """(loss, LoRA grads, peak bytes above what was allocated before) of forward + backward + optimizer step."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)  # same dropout masks in every run
    loss = model(*batch, batch[0])
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return loss.item(), grads, torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
def test_long_context_step_memory_gpu():
    """T = 65536 through 2 full-width layers: offloaded inputs + 16K-token MoE chunks + lean norms stay under a bound
    derived from the saved tensors, well below checkpointing alone, with the same loss and LoRA gradients.

    Units: A = T x H x 2 B = 65536 x 2880 x 2 = 0.352 GiB (one bf16 hidden state); q and o are [T, 4096]: 1.42 A;
    k and v 0.18 A each. Peak above the resident weights, reached while one layer runs backward:
      layer recomputed for backward (saved): its input A, normed input A, q/v dropout masks (bool) 2 x 0.5 A,
        q 1.42 A, k + v 0.36 A, o 1.42 A, lse 0.09 A, mid residual A, post-norm input A        ~ 8.3 A
      gradient into the layer A, next layer's input being prefetched A                          2 A
      one 16384-token MoE chunk in backward (S = 65536 rows): h [S, 2I] 2 A, dh 2 A, dX rows 1 A,
        fp32 copy of dOut 0.5 A; chunk input grads + their concatenation 2 A                   ~ 7.5 A
    ~ 18 A = 6.3 GiB; the bound below is 24 A + 0.5 GiB (8.9 GiB) for allocator rounding and kernel scratch.
    Loss and forward phases are lower (final norm input A + fp32 dH 2 A + slabs; one layer's transients ~ 12 A).
    Without offload and chunking the unchunked MoE alone needs h 8 A + dh 8 A + dX rows 4 A + 2 A at once, and
    both layer inputs stay on the GPU: ~ 30 A, so the lean configuration must save at least 8 A."""
    from fastft.model.offload import HostOffload

    T = 65536
    model, cfg = _full_width_model(layers=2)
    batch = packed_batch([T], cfg.vocab_size, device="cuda", generator=torch.Generator().manual_seed(0))
    # lr 0: the step allocates and updates Adam's state as in training but leaves the weights equal for the comparison
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    A = T * cfg.hidden_size * 2

    model.enable_gradient_checkpointing(True, offload=True)
    model.moe_chunk_tokens = 16384
    _measured_step(model, opt, batch)  # warm-up: Triton autotuning, optimizer state, pinned pages
    _, _, lean_warm = _measured_step(model, opt, batch)
    model.enable_gradient_checkpointing(True, offload=False)
    model.moe_chunk_tokens = None
    loss_plain, grads_plain, plain = _measured_step(model, opt, batch)
    model.enable_gradient_checkpointing(True, offload=True)
    model.moe_chunk_tokens = 16384
    assert isinstance(model._activation_offload, HostOffload)
    loss_lean, grads_lean, lean = _measured_step(model, opt, batch)

    gib = 2**30
    print(f"\npeak above weights at T={T}: checkpointing {plain / gib:.2f} GiB, + offload + MoE chunks "
          f"{lean / gib:.2f} GiB (warm-up repeat {lean_warm / gib:.2f}), A = {A / gib:.3f} GiB")
    assert lean <= 24 * A + gib // 2, f"{lean / A:.1f} A"
    assert lean <= plain - 8 * A, f"lean {lean / A:.1f} A vs plain {plain / A:.1f} A"
    assert abs(loss_lean - loss_plain) <= 1e-3 * abs(loss_plain)
    for n, g in grads_plain.items():
        err = (grads_lean[n] - g).norm() / g.norm().clamp_min(1e-30)
        assert err < 3e-2, f"{n}: relative error {err:.3g}"
