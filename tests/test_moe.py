"""MoE experts kernel (fastft.kernels.moe.moe) against the pure-torch reference and transformers' GptOssMLP + PEFT.

CPU: fp32, Triton interpreter, small odd shapes. GPU (-m gpu): bf16 at gpt-oss-20b shape, CUDA-graph capture;
there the fp32 reference takes the bf16 model's discrete decisions (routing, clamp masks): see `reference`.
"""

import pytest
import torch
import torch.nn.functional as F

import fastft.kernels.moe as moe_mod
from fastft.kernels.moe import _routing_tables, _routing_tables_reference, experts_reference, moe, moe_reference, route
from fastft.mxfp4 import MXFP4Tensor


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_mxfp4(E, out_f, in_f, device="cpu", lo=121, hi=126):
    """Random e2m1 codes; scales 2**(lo-127) .. 2**(hi-1-127) keep |w| around 0.1 so outputs stay O(1)."""
    blocks = torch.randint(0, 256, (E, out_f, in_f // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(lo, hi, (E, out_f, in_f // 32), dtype=torch.uint8, device=device)
    return MXFP4Tensor(blocks, scales)


def make_problem(T, H, I, E, k, r, quant, device="cpu", dtype=torch.float32, lora=True, pre_scale=4.0):
    """Random MoE inputs with biases randomised and gate_up scaled so both clamps fire."""
    if quant:
        gate_up, down = random_mxfp4(E, 2 * I, H, device), random_mxfp4(E, H, I, device)
    else:
        gate_up = torch.randn(E, H, 2 * I, device=device, dtype=dtype) * (pre_scale / H**0.5)
        down = torch.randn(E, I, H, device=device, dtype=dtype) / I**0.5
    p = dict(
        x=torch.randn(T, H, device=device, dtype=dtype),
        router_weight=torch.randn(E, H, device=device, dtype=dtype) / H**0.5,
        router_bias=torch.randn(E, device=device, dtype=dtype) * 0.1,
        top_k=k, gate_up=gate_up, down=down,
        gate_up_bias=torch.randn(E, 2 * I, device=device, dtype=dtype) * 2,
        down_bias=torch.randn(E, H, device=device, dtype=dtype),
    )
    if lora:
        def factors(n_in, n_out):
            A = torch.randn(r * E, n_in, device=device) / n_in**0.5
            B = torch.randn(n_out, r * E, device=device) * 0.3
            return (A.requires_grad_(), B.requires_grad_(), 2.0)
        p["gate_up_lora"] = factors(H, 2 * I)
        p["down_lora"] = factors(I, H)
    p["x"].requires_grad_()
    return p


def matched_routing(p, x32):
    """fp32 routing that takes the model-dtype router's decisions, for a fair low-precision comparison.

    HF routes in the model dtype, and so does moe: in bf16 about 1.5% of tokens pick another expert set than in fp32,
    and logits around a +-1e3 bias are rounded to multiples of 4, so an fp32-routed reference differs from the bf16
    pure-torch reference itself by 5-6% (57% with the skewed bias). Here: the bf16 top-k index, and fp32 weights
    from the bf16 logits' values (straight-through: the gradient is that of the fp32 logits).
    """
    x = p["x"].detach()
    logits_lp = F.linear(x, p["router_weight"], p["router_bias"]).float()
    _, index = route(x, p["router_weight"], p["router_bias"], p["top_k"])
    logits = F.linear(x32, p["router_weight"].float(), p["router_bias"].float())
    logits = logits + (logits_lp - logits).detach()
    return torch.softmax(logits.gather(1, index), dim=-1), index


def reference(p, x32):
    """moe_reference in fp32 on the problem's (possibly bf16) inputs, taking the model dtype's discrete decisions:
    its routing (matched_routing) and its clamp masks (the gate_up pre-activation rounded to the model dtype, as
    the kernel saves it for backward). Without the latter, the ~0.1% of pre-activations within half a bf16 ulp of
    +-7 flip their clamp mask and alone move dX and the gate_up LoRA grads by ~5%, the bf16 torch reference's too."""
    if p["x"].dtype == torch.float32:
        return moe_reference(**{**p, "x": x32})
    weights, index = matched_routing(p, x32)
    f = {key: (p[key].float() if isinstance(p[key], torch.Tensor) else p[key])
         for key in ("gate_up", "gate_up_bias", "down", "down_bias")}
    return experts_reference(x32, weights, index, **f, gate_up_lora=p.get("gate_up_lora"),
                             down_lora=p.get("down_lora"), h_dtype=p["x"].dtype)


def run_both(p, check_clamps=True, impl=None):
    """Output and grads (x, every LoRA factor) of the kernel and of the fp32 reference, same upstream gradient."""
    params = [p["x"]] + [t for key in ("gate_up_lora", "down_lora") if p.get(key) for t in p[key][:2]]
    out = (impl or moe)(**p)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    x32 = p["x"].detach().float().requires_grad_() if p["x"].dtype != torch.float32 else p["x"]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a TF32 reference would flip clamp masks itself
    try:
        ref = reference(p, x32)
        ref_grads = torch.autograd.grad(ref, [x32] + params[1:], g.float())
    finally:
        torch.set_float32_matmul_precision(precision)
    if check_clamps:
        gu = p["x"].detach().float() @ dense(p["gate_up"])[0] + p["gate_up_bias"][0].float()
        assert (gu[:, ::2] > 7).any() and (gu[:, 1::2].abs() > 7).any(), "clamps never fire: test too weak"
    return out, grads, ref, ref_grads


def dense(w):
    return w.dequantize() if isinstance(w, MXFP4Tensor) else w.float()


@pytest.mark.parametrize("quant", [True, False])
def test_moe_matches_reference(quant):
    # MXFP4 needs H, I multiples of 32; the dense path takes odd sizes (masks on every edge)
    T, H, I, E, k, r = (29, 64, 32, 5, 3, 3) if quant else (19, 40, 24, 5, 3, 3)
    p = make_problem(T, H, I, E, k, r, quant)
    out, grads, ref, ref_grads = run_both(p)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-5


@pytest.mark.parametrize("quant", [True, False])
def test_moe_swapped_operands_match_reference(quant, monkeypatch):
    """The SWAP_AB tiles (C^T = W^T A^T, the autotuner's other orientation on the GPU) compute the same function."""
    monkeypatch.setattr(moe_mod, "_FORCE_META", dict(BN=32, BK=32, SWAP_AB=True, num_warps=4, num_stages=1))
    T, H, I, E, k, r = (29, 64, 32, 5, 3, 3) if quant else (19, 40, 24, 5, 3, 3)
    out, grads, ref, ref_grads = run_both(make_problem(T, H, I, E, k, r, quant))
    assert rel(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-5


def test_checkpoint_recompute_skips_the_output_and_keeps_the_gradients():
    """Under a checkpoint whose recompute runs in output_unused (as the model's decoder layers do), the down GEMM
    is not recomputed yet every gradient equals the plain run's; in output_unused itself the output is zeros."""
    from torch.utils.checkpoint import checkpoint

    from fastft.backends import output_unused, recompute_skips_output

    p = make_problem(23, 64, 32, 5, 3, 3, quant=True)
    params = [p["x"]] + [t for key in ("gate_up_lora", "down_lora") for t in p[key][:2]]

    def block(x):
        return moe(**{**p, "x": x}) * 1.5  # an op after the block that saves nothing

    out = block(p["x"])
    g = torch.randn_like(out)
    plain = torch.autograd.grad(out, params, g)
    out_ckpt = checkpoint(block, p["x"], use_reentrant=False, context_fn=recompute_skips_output)
    assert torch.equal(out_ckpt, out)
    for a, b in zip(torch.autograd.grad(out_ckpt, params, g), plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with output_unused():
        assert not block(p["x"]).any()
        with torch.no_grad():  # without grad there is no backward to serve: the output is computed
            torch.testing.assert_close(block(p["x"]), out.detach())


def test_moe_no_lora_and_one_sided_lora():
    p = make_problem(13, 64, 32, 4, 2, 2, quant=True)
    down_lora = p.pop("down_lora")
    out, grads, ref, ref_grads = run_both(p, check_clamps=False)
    assert rel(out, ref) < 1e-5 and all(rel(g, rg) < 1e-5 for g, rg in zip(grads, ref_grads))
    p.pop("gate_up_lora")
    p["down_lora"] = down_lora
    out, grads, ref, ref_grads = run_both(p, check_clamps=False)
    assert rel(out, ref) < 1e-5 and all(rel(g, rg) < 1e-5 for g, rg in zip(grads, ref_grads))


@pytest.mark.parametrize("k,hot", [(1, (2,)), (2, (0, 3))])
def test_moe_skewed_routing(k, hot):
    """Every token to the same k experts: the others get zero tokens, the hot ones all T (several tiles)."""
    p = make_problem(37, 64, 32, 5, k, 2, quant=True)
    bias = torch.full((5,), -1e4)
    bias[list(hot)] = 1e4
    p["router_bias"] = bias
    out, grads, ref, ref_grads = run_both(p, check_clamps=False)
    assert rel(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-5


def test_moe_skewed_routing_gpu_tiling(monkeypatch):
    """The GPU's row tile (BM=128) and tile grouping, every expert holding several tiles (the bf16 GPU test's case)."""
    monkeypatch.setattr(moe_mod, "_BM_FIXED", 128)
    monkeypatch.setattr(moe_mod, "GROUP_M", 8)
    p = make_problem(300, 64, 32, 6, 4, 2, quant=True)
    bias = torch.full((6,), -1e4)
    bias[[0, 2, 3, 5]] = 1e4
    p["router_bias"] = bias
    out, grads, ref, ref_grads = run_both(p, check_clamps=False)
    assert rel(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-5


def test_bf16_reference_takes_the_bf16_routing():
    """Regression: the bf16 GPU tests compared against fp32-routed references. With a +-1e3 router bias, bf16
    logits are multiples of 4, so the routing weights themselves differ by O(1): the fair reference must keep them."""
    p = make_problem(64, 64, 32, 8, 4, 2, quant=False, dtype=torch.bfloat16, lora=False)
    bias = torch.full((8,), -1e3, dtype=torch.bfloat16)
    bias[[1, 2, 5, 6]] = 1e3
    p["router_bias"] = bias
    x32 = p["x"].detach().float()
    w_lp, index = route(p["x"].detach(), p["router_weight"], p["router_bias"], 4)
    w_fair, index_fair = matched_routing(p, x32)
    assert torch.equal(index_fair, index)
    assert rel(w_fair, w_lp.float()) < 1e-2
    w_32, _ = route(x32, p["router_weight"].float(), p["router_bias"].float(), 4)
    assert rel(torch.sort(w_32, 1).values, torch.sort(w_fair, 1).values) > 0.1  # what the old test compared


@pytest.mark.parametrize("T,k,H", [(5, 3, 37), (1, 4, 300), (0, 2, 8)])
def test_slot_sum_weighted_and_plain(T, k, H):
    # the forward's routing-weighted k-sum and the backward's plain one, fp32 inside, against fp64
    y = torch.randn(T * k, H)
    w = torch.rand(T, k)
    want = (y.double().view(T, k, H) * w.double()[:, :, None]).sum(1)
    assert torch.allclose(moe_mod._slot_sum(y, k, w).double(), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(moe_mod._slot_sum(y, k).double(), y.double().view(T, k, H).sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T, E, k, BM, skew", [(23, 6, 3, 4, "crowded"), (1, 5, 2, 16, "none"), (0, 4, 2, 4, "none"),
                                                (700, 32, 4, 16, "one_expert"), (301, 7, 1, 8, "empty_experts")])
def test_routing_tables_cover_every_row_once(T, E, k, BM, skew):
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if skew == "crowded":
        index[:, 0] = 1
    elif skew == "one_expert":
        index[:, 0] = E - 1  # every token goes to the last expert
    elif skew == "empty_experts":
        index = index % 3  # experts 3.. get nothing
    weights = torch.rand(T, k)
    (row_token, pair, offsets, tile_expert, tile_row), rowscale = _routing_tables(index, weights, E, BM)
    S = T * k
    assert tile_expert.numel() == -(-S // BM) + E
    seen = torch.zeros(S, dtype=torch.int32)
    for e, r0 in zip(tile_expert.tolist(), tile_row.tolist()):
        if e < 0:
            continue
        end = min(r0 + BM, offsets[e + 1].item())
        assert offsets[e] <= r0 < end
        seen[r0:end] += 1
    assert (seen == 1).all()
    flat = index.reshape(-1)
    assert torch.equal(flat[pair.long()], torch.sort(flat).values)
    assert torch.equal(row_token.long(), pair.long() // k)
    assert torch.equal(rowscale, weights.reshape(-1)[pair.long()])
    # the one-kernel tables are the torch reference's, entry for entry (unused tiles: expert -1, row 0)
    for got, want in zip((row_token, pair, offsets, tile_expert, tile_row), _routing_tables_reference(index, E, BM)):
        assert torch.equal(got, want)


def gate_up_from_row(p, row_start, bm=None):
    """The gate_up GEMM's h (epilogue 1) into a NaN-filled buffer, computed from sorted row ``row_start`` on."""
    x = p["x"].detach()
    weights, index = route(x, p["router_weight"], p["router_bias"], p["top_k"])
    E, S = p["gate_up_bias"].shape[0], x.shape[0] * p["top_k"]
    bm = bm or moe_mod._row_tile(S, E)
    tables, _ = _routing_tables(index, weights, E, bm)
    args = moe_mod._weight_args(p["gate_up"], x.dtype, True)
    h = torch.full((S, args[8]), float("nan"), device=x.device, dtype=x.dtype)
    act = torch.empty(S, args[8] // 2, device=x.device, dtype=x.dtype)
    moe_mod._gemm(x, tables[0], args, tables, bm, act, bias=p["gate_up_bias"], epi=1, aux=h, row_start=row_start)
    return h


def check_row_start(p, bm=None):
    """Rows from row_start on are the full GEMM's, bit for bit; tiles wholly below it are not computed."""
    full = gate_up_from_row(p, 0, bm)
    assert not full.isnan().any()
    S = full.shape[0]
    for row_start in (S // 3, S - 1, S):
        part = gate_up_from_row(p, row_start, bm)
        assert torch.equal(part[row_start:], full[row_start:])
        done = ~part[:row_start].isnan().any(1)
        assert torch.equal(part[:row_start][done], full[:row_start][done])  # a tile straddling row_start: whole
        assert not done[: row_start // 2].all(), "nothing skipped"


@pytest.mark.parametrize("quant", [True, False])
def test_gemm_row_start_skips_the_rows_before(quant):
    T, H, I, E, k = (29, 64, 32, 3, 2) if quant else (31, 40, 24, 3, 2)
    check_row_start(make_problem(T, H, I, E, k, 2, quant, lora=False))


def _peft_mlp(p, E, H, I, k, r, alpha):
    """transformers' GptOssMLP holding p's (dequantised) weights, with PEFT target_parameters LoRA on the experts."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    mlp = GptOssMLP(cfg)
    with torch.no_grad():
        mlp.router.weight.copy_(p["router_weight"])
        mlp.router.bias.copy_(p["router_bias"])
        mlp.experts.gate_up_proj.copy_(dense(p["gate_up"]))
        mlp.experts.gate_up_proj_bias.copy_(p["gate_up_bias"])
        mlp.experts.down_proj.copy_(dense(p["down"]))
        mlp.experts.down_proj_bias.copy_(p["down_bias"])
    model = get_peft_model(mlp, LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=r,
                                           lora_alpha=alpha, target_modules=[]))
    loras = {}
    for module in model.modules():
        if hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
            loras[module.parameter_name] = (module.lora_A["default"].weight, module.lora_B["default"].weight,
                                            module.scaling["default"])
    return model, loras


def test_moe_matches_transformers_gpt_oss_mlp_with_peft():
    T, H, I, E, k, r = 21, 64, 32, 4, 2, 4
    p = make_problem(T, H, I, E, k, r, quant=True, lora=False)
    model, loras = _peft_mlp(p, E, H, I, k, r, alpha=2 * r)
    with torch.no_grad():
        for A, B, _ in loras.values():  # PEFT starts B at zero; make both factors matter
            A.normal_(0, 0.2)
            B.normal_(0, 0.2)
    x_hf = p["x"].detach().clone().requires_grad_()
    out_hf, _ = model(x_hf[None])
    g = torch.randn_like(out_hf[0])
    out_hf[0].backward(g)

    p["gate_up_lora"] = tuple(t.detach().clone().requires_grad_() if i < 2 else t
                              for i, t in enumerate(loras["gate_up_proj"]))
    p["down_lora"] = tuple(t.detach().clone().requires_grad_() if i < 2 else t
                           for i, t in enumerate(loras["down_proj"]))
    out = moe(**p)
    out.backward(g)
    assert rel(out, out_hf[0]) < 1e-5
    assert rel(p["x"].grad, x_hf.grad) < 1e-5
    for name in ("gate_up_proj", "down_proj"):
        for mine, theirs in zip(p[name.replace("_proj", "_lora")][:2], loras[name][:2]):
            assert rel(mine.grad, theirs.grad) < 1e-5


# ---------------------------------------------------------------------------------------------------------------- GPU
GPT_OSS = dict(H=2880, I=2880, E=32, k=4, r=16)


def count_ws_launches(monkeypatch):
    """Counts the Hopper kernels' launches by kernel: on sm_90 the MXFP4 GEMMs must take one unless FASTFT_MOE_WS=0
    (lora_linear_hopper's grouped kernel unless FASTFT_MOE_REGISTER=0, else moe_hopper's)."""
    calls = []
    for mod, name in ((moe_mod.moe_hopper, "ws_gemm"), (moe_mod.lora_linear_hopper, "grouped_gemm")):
        def counted(*a, _launch=getattr(mod, name), _name=name, **kw):
            calls.append(_name)
            return _launch(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    return calls


def expect_ws(quant):
    return quant and moe_mod.moe_hopper.enabled() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
# None: _row_tile's pick (at this T: 256 for the register kernel, else 128); 128 and 256 forced
@pytest.mark.parametrize("bm", [None, 128, 256])
# ws 0: the Triton kernel on sm_90; reg 0: moe_hopper's kernel instead of lora_linear_hopper's grouped one
@pytest.mark.parametrize("quant,ws,reg", [(True, "1", "1"), (True, "1", "0"), (True, "0", "1"), (False, "1", "1")])
def test_moe_gpu_gpt_oss_shape_bf16(quant, ws, reg, bm, monkeypatch):
    monkeypatch.setattr(moe_mod, "_BM_FIXED", bm)
    monkeypatch.setenv("FASTFT_MOE_WS", ws)
    monkeypatch.setenv("FASTFT_MOE_REGISTER", reg)
    calls = count_ws_launches(monkeypatch)
    c = GPT_OSS
    torch.manual_seed(1)
    p = make_problem(2053, c["H"], c["I"], c["E"], c["k"], c["r"], quant, device="cuda", dtype=torch.bfloat16)
    out, grads, ref, ref_grads = run_both(p)
    # gate_up and down, forward and dX
    assert calls == (4 * ["grouped_gemm" if reg == "1" else "ws_gemm"] if expect_ws(quant) else []), calls
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2, rel(out, ref)
    errs = [rel(g, rg) for g, rg in zip(grads, ref_grads)]
    assert all(e < 1e-2 for e in errs), errs


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [None, 256])
@pytest.mark.parametrize("ws,reg", [("1", "1"), ("1", "0"), ("0", "1")])
@pytest.mark.parametrize("T,tails", [(1031, "1"), (1031, "0"), (1024, "1"), (1160, "1")])
def test_moe_gpu_skewed_routing_bf16(ws, reg, bm, T, tails, monkeypatch):
    """Four experts get every token, 28 none. At 256-row tiles each busy expert ends in a 7-row tail (1031: the
    BM=128 tail launch), in no tail (1024) or in a 136-row one (1160: a BM=256 tile); tails "0" = one launch."""
    monkeypatch.setattr(moe_mod, "_BM_FIXED", bm)
    monkeypatch.setenv("FASTFT_MOE_WS", ws)
    monkeypatch.setenv("FASTFT_MOE_REGISTER", reg)
    monkeypatch.setenv("FASTFT_MOE_TAILS", tails)
    c = GPT_OSS
    p = make_problem(T, c["H"], c["I"], c["E"], c["k"], c["r"], True, device="cuda", dtype=torch.bfloat16)
    bias = torch.full((c["E"],), -1e3, device="cuda", dtype=torch.bfloat16)
    bias[[3, 7, 8, 30]] = 1e3  # every token to the same 4 experts; 28 experts get none
    p["router_bias"] = bias
    out, grads, ref, ref_grads = run_both(p, check_clamps=False)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2, rel(out, ref)
    errs = [rel(g, rg) for g, rg in zip(grads, ref_grads)]
    assert all(e < 1e-2 for e in errs), errs


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [128, 256])
@pytest.mark.parametrize("ws,reg", [("1", "1"), ("1", "0"), ("0", "1")])
def test_gemm_gpu_row_start(ws, reg, bm, monkeypatch):
    """row_start in the three kernels (moe_hopper's with its BM=128 tail launch at bm 256), gpt-oss shape, bf16."""
    monkeypatch.setenv("FASTFT_MOE_WS", ws)
    monkeypatch.setenv("FASTFT_MOE_REGISTER", reg)
    c = GPT_OSS
    check_row_start(make_problem(1031, c["H"], c["I"], c["E"], c["k"], c["r"], True, device="cuda",
                                 dtype=torch.bfloat16, lora=False), bm)


@pytest.mark.gpu
def test_moe_gpu_forward_captures_in_cuda_graph():
    """No host synchronisation: the forward (routing included) captures into a CUDA graph and replays correctly."""
    c = GPT_OSS
    p = make_problem(517, c["H"], c["I"], c["E"], c["k"], c["r"], True, device="cuda", dtype=torch.bfloat16)
    p["x"] = p["x"].detach()
    with torch.no_grad():
        for _ in range(2):  # compile and warm up outside the capture
            moe(**p)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(**p)
        p["x"].copy_(torch.randn_like(p["x"]))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, moe(**p)) < 1e-6
