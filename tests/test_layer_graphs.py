"""fastft.model.layer_graphs: the hand-checkpointed (and, on CUDA, graph-replayed) layer stack gives the gradients of
the plain model, dropout included, with and without activation offload and token padding."""

import pytest
import torch

from fastft.backends import get_backend
from fastft.model import GptOssForTraining, LoraSettings, apply_lora
from fastft.model.lora import trainable_parameters
from fastft.model.testing import packed_batch, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(kernels, targets, dropout, device="cpu", dtype=torch.float32, **cfg):
    cfg = tiny_config(**cfg)
    torch.manual_seed(0)
    model = GptOssForTraining.from_config(cfg, dtype, device, get_backend(kernels, device))
    with torch.no_grad():  # biases and sinks away from 0, experts large enough that the SwiGLU clamps fire
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5)
            elif "experts" in name:
                p.normal_(0.0, 2.0 / p.shape[-2] ** 0.5)
    apply_lora(model, LoraSettings(targets=targets, r=2, dropout=dropout))
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.normal_(0.0, 0.3)
    return model.train()


def _step(model, batch, seed):
    ids, pos, cu = batch
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(ids, pos, cu, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for _, p in trainable_parameters(model)], torch.get_rng_state()


@pytest.mark.parametrize("kernels,targets,dropout,offload,pad_to,keep", [
    ("torch", "attn", 0.3, False, 1, 0),  # dropout: the recompute must draw the forward's masks
    ("torch", "attn", 0.3, True, 1, 0),
    ("torch", "all", 0.0, True, 16, 0),  # padded tokens add nothing
    ("triton", "all", 0.0, False, 16, 0),  # the Triton MoE skips its output in the recompute
    ("triton", "all", 0.0, False, 16, 1.0),  # ... and with kept activations its gate_up GEMM (expert LoRA too)
    ("triton", "attn", 0.3, True, 1, 1.0),
])
def test_same_gradients_as_plain(kernels, targets, dropout, offload, pad_to, keep):
    model = _model(kernels, targets, dropout)
    batch = packed_batch([5, 1, 8], model.config.vocab_size)
    want_loss, want, want_rng = _step(model, batch, seed=3)  # no checkpointing at all
    model.enable_gradient_checkpointing(True, offload=offload)
    model.use_layer_graphs(True, pad_to=pad_to, keep_gib=keep)
    for _ in range(2):  # a second step reuses nothing stale
        loss, got, rng = _step(model, batch, seed=3)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert torch.equal(rng, want_rng)  # the generator ends where the forward left it: next masks are new


def test_kept_layers_skip_the_gate_up_recompute(monkeypatch):
    """Layers within the keep budget recompute no expert GEMM (the forward kept h); the others recompute gate_up."""
    from fastft.kernels import moe

    model = _model("triton", "all", 0.0, num_hidden_layers=3)
    model.enable_gradient_checkpointing(True)
    per_layer = 16 * model._kept_bytes_per_token()  # 13 tokens pad to 16
    calls = []
    real = moe._gemm
    monkeypatch.setattr(moe, "_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = packed_batch([5, 8], model.config.vocab_size)
    counts = {}
    for kept in (0, 2, 3):
        model.use_layer_graphs(True, pad_to=16, keep_gib=(kept * per_layer + 100) / 2**30)
        calls.clear()
        _step(model, batch, seed=1)
        counts[kept] = len(calls)
    # per layer: forward gate_up + down, recompute gate_up unless kept, backward down + gate_up
    assert counts == {0: 15, 2: 13, 3: 12}


@pytest.mark.parametrize("targets,share,extra_gemms", [("all", 0.5, 3), ("all", 1.0, 0), ("qv", 0.3, 3)])
def test_spilled_stashes_give_the_plain_gradients(monkeypatch, targets, share, extra_gemms):
    """With offload and room for two layers' h, the three layers below keep theirs in host memory through the two
    layers' buffers (each overwritten by the layer two above before the backward needs it back). Only the first
    `share` of h's rows come back; the recompute runs the gate_up GEMM past them (one call per spilled layer)."""
    from fastft.kernels import moe

    model = _model("triton", targets, 0.0, num_hidden_layers=5)
    batch = packed_batch([5, 8], model.config.vocab_size)
    _, want, _ = _step(model, batch, seed=2)
    model.enable_gradient_checkpointing(True, offload=True)
    model.use_layer_graphs(True, pad_to=16, keep_gib=(2 * 16 * model._kept_bytes_per_token() + 100) / 2**30)
    _step(model, batch, seed=2)  # builds the stack: on CPU nothing measured, so nothing spilled yet
    stack = model._layer_graphs[1]
    assert stack.kept_layers(16, torch.device("cpu")) == (2, 0, 0)
    stack.spill_share_override = share
    assert stack.kept_layers(16, torch.device("cpu")) == (2, 0, 3)
    calls = []
    real = moe._gemm
    monkeypatch.setattr(moe, "_gemm", lambda *a, **k: calls.append(k.get("row_start", 0)) or real(*a, **k))
    for _ in range(2):
        calls.clear()
        _, got, _ = _step(model, batch, seed=2)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert len(calls) == 5 * 4 + extra_gemms
        assert sorted(calls)[-extra_gemms:] == [int(16 * 2 * share)] * extra_gemms if extra_gemms else True


def test_whole_layers_are_not_recomputed(monkeypatch):
    """After the first step has measured what a layer's autograd graph holds, the budget left once every layer keeps
    its MoE's h goes to whole layers: their forward keeps its graph and their backward recomputes nothing, with the
    plain model's gradients (dropout included)."""
    from fastft.kernels import moe

    model = _model("triton", "attn", 0.3, num_hidden_layers=3)
    batch = packed_batch([5, 8], model.config.vocab_size)
    _, want, _ = _step(model, batch, seed=4)
    model.enable_gradient_checkpointing(True, offload=True)
    model.use_layer_graphs(True, pad_to=1, keep_gib=1.0)  # no padding: dropout draws the plain masks
    calls = []
    real = moe._routing_tables
    monkeypatch.setattr(moe, "_routing_tables", lambda *a, **k: calls.append(1) or real(*a, **k))
    _step(model, batch, seed=4)
    assert len(calls) == 6  # first step: h kept everywhere, the rest of each layer recomputed
    stack = model._layer_graphs[1]
    per_h, per_whole = 13 * stack.keep_bytes_per_token, 13 * stack.whole_bytes_per_token
    assert per_whole > per_h
    stack.keep = 3 * per_h + 2 * (per_whole - per_h) + 10  # room for two whole layers
    assert stack.kept_layers(13, torch.device("cpu")) == (1, 2, 0)
    calls.clear()
    _, got, _ = _step(model, batch, seed=4)
    assert len(calls) == 4  # two whole layers route once, the third twice
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_keep_gib_is_checked():
    model = _model("torch", "qv", 0.0)
    for bad in (-1, "all", None):
        with pytest.raises(ValueError, match="keep_gib"):
            model.use_layer_graphs(True, keep_gib=bad)


def test_new_lora_rebuilds_the_stack():
    model = _model("torch", "qv", 0.0)
    model.enable_gradient_checkpointing(True)
    model.use_layer_graphs(True, pad_to=8)
    batch = packed_batch([6, 3], model.config.vocab_size)
    _step(model, batch, seed=1)
    first = model._layer_graphs[1]
    for _, p in trainable_parameters(model):
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.lora_A.requires_grad_(True)
    _, grads, _ = _step(model, batch, seed=1)
    assert model._layer_graphs[1] is not first and len(grads) == 1


def test_long_rows_keep_torch_checkpoint():
    """Rows the MoE would chunk run torch.utils.checkpoint (the stack's halves never chunk)."""
    model = _model("torch", "qv", 0.0)
    model.enable_gradient_checkpointing(True)
    model.use_layer_graphs(True, pad_to=4)
    model.moe_chunk_tokens = 8
    batch = packed_batch([6, 5], model.config.vocab_size)
    want_loss, want, _ = _step(model, batch, seed=2)
    assert model._graphed_layers(11) is None
    model.use_layer_graphs(False)
    loss, got, _ = _step(model, batch, seed=2)
    torch.testing.assert_close(loss, want_loss)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_graphs_replay_the_eager_stack(offload):
    """On CUDA (bf16, Triton kernels, dropout): steps 1 (eager), 2 (capture) and 3-4 (replay) give the gradients of
    the same stack run eagerly, bit for bit (same kernels, same dropout masks), also where the captured plans keep the
    experts' activations instead of recomputing them; a second token count is captured too, a third runs eagerly."""
    kw = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, head_dim=64, sliding_window=5)
    graphed = _model("triton", "all", 0.0, "cuda", torch.bfloat16, **kw)
    eager = _model("triton", "all", 0.0, "cuda", torch.bfloat16, **kw)
    for m in (graphed, eager):
        for layer in m.model.layers:  # dropout on the attention adapters (the expert ones take none)
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.dropout = 0.2
        m.enable_gradient_checkpointing(True, offload=offload)
    graphed.use_layer_graphs(True, graphs=True, pad_to=64, keep_gib="auto")  # captured plans keep activations
    eager.use_layer_graphs(True, graphs=False, pad_to=64)
    V = graphed.config.vocab_size
    batches = [packed_batch(n, V, "cuda") for n in ([37, 5, 64], [50, 40, 16], [100], [3, 60], [200, 9], [9, 200],
                                                    [7, 7, 7])]
    for step, batch in enumerate(batches):
        a_loss, a, _ = _step(graphed, batch, seed=10 + step)
        b_loss, b, _ = _step(eager, batch, seed=10 + step)
        assert torch.equal(a_loss, b_loss), step
        for x, y in zip(a, b):
            assert torch.equal(x, y), step
    assert len(graphed._layer_graphs[1]._plans) == 2
    # every layer keeps its whole graph (the first step measured it; the H200 has room): no recompute at all
    assert set(graphed.kept_layers().values()) == {(0, 4, 0, 0.0)}



@pytest.mark.gpu
@pytest.mark.parametrize("share", [None, 0.5])
def test_graphs_with_spilled_stashes_replay_the_eager_stack(share):
    """On CUDA with offload and room for two layers' h: the three layers below keep theirs in pinned host memory
    (copies on the side stream inside the captured graphs; the share measured, or half of the rows); the gradients
    are the eager recomputing stack's, bit for bit."""
    kw = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=5, head_dim=64, sliding_window=5)
    graphed = _model("triton", "all", 0.0, "cuda", torch.bfloat16, **kw)
    eager = _model("triton", "all", 0.0, "cuda", torch.bfloat16, **kw)
    for m in (graphed, eager):
        m.enable_gradient_checkpointing(True, offload=True)
    graphed.use_layer_graphs(True, graphs=True, pad_to=64,
                             keep_gib=(2 * 128 * graphed._kept_bytes_per_token() + 100) / 2**30)
    eager.use_layer_graphs(True, graphs=False, pad_to=64)
    V = graphed.config.vocab_size
    for step, n in enumerate(([37, 5, 64], [50, 40, 16], [100, 6], [9, 90, 7])):  # all pad to 128 tokens
        batch = packed_batch(n, V, "cuda")
        a_loss, a, _ = _step(graphed, batch, seed=10 + step)
        if step == 0:
            graphed._layer_graphs[1].spill_share_override = share
        b_loss, b, _ = _step(eager, batch, seed=10 + step)
        assert torch.equal(a_loss, b_loss), step
        for x, y in zip(a, b):
            assert torch.equal(x, y), step
    (kept,) = graphed.kept_layers().values()
    assert kept[:3] == (2, 0, 3) and 0.1 <= kept[3] <= 1 and (share is None or kept[3] == share), kept


def test_two_forwards_before_backward():
    """A second forward while the first one's backward is pending must not take the first one's buffers (a captured
    plan's are shared by every step of its size; here a shared eager plan stands in for it on the CPU)."""
    from fastft.model.layer_graphs import _Plan

    model = _model("torch", "attn", 0.0)
    model.enable_gradient_checkpointing(True)
    model.use_layer_graphs(True, pad_to=16)
    a, b = (packed_batch(n, model.config.vocab_size) for n in ([6, 3], [4, 5]))  # both pad to 16 tokens
    want = [x + y for x, y in zip(_step(model, a, 0)[1], _step(model, b, 0)[1])]
    stack = model._graphed_layers(9)
    cos, _ = model.rope(a[1], torch.float32)
    stack._plans[(16, torch.float32, torch.device("cpu"), False)] = _Plan(stack, 16, cos.new_zeros(9, 32), cos,
                                                                          False, graphed=False)
    model.zero_grad()
    losses = [model(*batch, batch[0].masked_fill(torch.zeros_like(batch[0], dtype=torch.bool)
                                                 .index_fill_(0, batch[2][:-1].long(), True), -100))
              for batch in (a, b)]
    sum(losses).backward()
    for got, w in zip((p.grad for _, p in trainable_parameters(model)), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
