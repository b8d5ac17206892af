"""Quantisers and 4-bit weight holders: MXFP4 (fastft's OCP quantiser) and NF4 (bitsandbytes)."""

import pytest
import torch

from fastft.mxfp4 import FP4_VALUES, MXFP4Tensor, dequantize_mxfp4
from fastft.quant import NF4Tensor, quantize_mxfp4, quantize_nf4, quantize_weight, scheme_for

try:
    import bitsandbytes.functional as bnbf
except Exception as e:  # noqa: BLE001 - any import failure means "no bnb here"
    bnbf, _BNB_ERR = None, repr(e)
needs_bnb = pytest.mark.skipif(bnbf is None, reason="bitsandbytes is not importable here")


def _random_mxfp4(*lead, k, device="cpu"):
    blocks = torch.randint(0, 256, (*lead, k // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(110, 135, (*lead, k // 32), dtype=torch.uint8, device=device)
    return blocks, scales


def _mxfp4_reference(w):
    """Slow, obviously-correct OCP MX quantisation of [R, K] in fp64: argmin over the 8 magnitudes, even on ties."""
    grid = torch.tensor(sorted(set(abs(v) for v in FP4_VALUES)), dtype=torch.float64)
    g = w.double().reshape(w.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    a = (g / 2.0**e).abs().clamp(max=6)
    d = (a.unsqueeze(-1) - grid).abs()
    best = d.min(-1, keepdim=True).values
    # a tie is between two neighbouring codes, one of them even: round-to-nearest-even keeps that one
    is_best = d == best
    even_best = is_best & (torch.arange(8) % 2 == 0)
    mag = grid[torch.where(even_best.any(-1, keepdim=True), even_best, is_best).float().argmax(-1)]
    return (torch.where(g < 0, -mag, mag) * 2.0**e).reshape(w.shape)


@pytest.mark.parametrize("shape", [(7, 96), (3, 64, 5)])
def test_mxfp4_representable_values_are_bit_exact(shape):
    # MXFP4 weights whose every block holds a +-4 or +-6 (so the OCP exponent is the stored one): bytes come back.
    if len(shape) == 2:
        blocks, scales = _random_mxfp4(shape[0], k=shape[1])
    else:
        blocks, scales = _random_mxfp4(shape[0], shape[2], k=shape[1])
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | torch.tensor([6, 7, 14, 15], dtype=torch.uint8)[
        torch.randint(0, 4, blocks[..., 0].shape)]
    ref = MXFP4Tensor(blocks, scales)
    w = ref.dequantize(torch.bfloat16)
    q = quantize_mxfp4(w, chunk_elems=100)  # tiny chunks exercise the chunk loop
    assert torch.equal(q.scales, scales) and torch.equal(q.blocks, blocks)
    assert torch.equal(q.dequantize(torch.float32), ref.dequantize(torch.float32))


def test_mxfp4_any_grid_values_roundtrip_exactly():
    # values on the grid but with smaller block maxima pick a smaller exponent: other bytes, same numbers
    blocks, scales = _random_mxfp4(9, k=160)
    w = dequantize_mxfp4(blocks, scales)
    assert torch.equal(quantize_mxfp4(w).dequantize(), w)


def test_mxfp4_rounding_matches_reference_and_error_bound():
    w = torch.randn(13, 224) * torch.logspace(-3, 2, 13).unsqueeze(1)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = -0.0
    q = quantize_mxfp4(w)
    deq = q.dequantize()
    assert torch.equal(deq, _mxfp4_reference(w).float())
    # e2m1 has one mantissa bit: relative step <= 1/4 of the block scale, so |err| <= amax / 4 per block
    amax = w.abs().reshape(13, -1, 32).amax(-1, keepdim=True)
    assert ((deq - w).abs().reshape(13, -1, 32) <= amax / 4 + 1e-30).all()
    assert q.shape == (13, 224)


def test_mxfp4_ties_round_to_even_and_saturate():
    # block max 6 -> exponent 0; 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 6.5 -> 6
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.0] * 22)
    got = quantize_mxfp4(row.unsqueeze(0)).dequantize()[0, :10]
    assert got.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]


def test_mxfp4_expert_layout_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(3, 40, k=96)  # hub layout [E, out, in/32, 16]
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    assert torch.equal(MXFP4Tensor(blocks, scales).dequantize(torch.bfloat16), hf)
    q = quantize_mxfp4(hf)
    assert q.shape == tuple(hf.shape)
    assert torch.equal(q.dequantize(torch.bfloat16), hf)


@needs_bnb
@pytest.mark.parametrize("shape", [(75, 96), (64, 2880 // 10), (17, 128), (3, 32, 10)])
def test_nf4_holder_matches_bnb(shape):
    w = torch.randn(*shape, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    assert q.shape == tuple(w.shape) and q.data.dtype == torch.uint8 and q.quant_state.nested
    # our double-quant decode is bnb's, bit for bit
    absmax = bnbf.dequantize_blockwise(q.quant_state.absmax, q.quant_state.state2) + q.quant_state.offset
    assert torch.equal(q.absmax_fp32(), absmax.float())
    # nibble order + codebook + flat blocks: bit-exact with bnb. Its native CPU dequantize_4bit is wrong when a
    # 64-block straddles rows (in % 64 != 0; never at gpt-oss shapes), so there compare with bnb's flat torch path.
    if shape[-1] % 64 == 0:
        ref = bnbf.dequantize_4bit(q.data, q.quant_state)
    else:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        ref = _dequantize_4bit_compute(q.data.reshape(-1), absmax.float(), q.code, 64, w.shape, torch.bfloat16)
    assert torch.equal(q.decode(torch.bfloat16), ref)
    assert torch.equal(q.dequantize(torch.bfloat16), ref)
    rel = (q.dequantize().float() - w.float()).norm() / w.float().norm()
    assert rel < 0.12
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize()) and moved.nbytes() == q.nbytes()
    tables = (256 + 16 + 1) * 4  # the two code tables and the offset, fixed per tensor
    assert q.nbytes() - tables <= w.numel() * (4 / 8 + 1 / 64 + 4 / (64 * 256)) + 8  # ~4.13 bits/weight


def test_policy():
    assert scheme_for("model.layers.3.mlp.experts.gate_up_proj") == "mxfp4"
    assert scheme_for("model.layers.3.mlp.experts.down_proj", experts="nf4") == "nf4"
    assert scheme_for("model.layers.0.self_attn.o_proj.weight") == "nf4"
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.router.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.sinks"):
        assert scheme_for(name) == "none"
    t = torch.randn(4, 64)
    assert quantize_weight("lm_head.weight", t) is t
    assert isinstance(quantize_weight("x.self_attn.q_proj.weight", t, scheme="mxfp4"), MXFP4Tensor)
    if bnbf is not None:
        assert isinstance(quantize_weight("x.self_attn.q_proj.weight", t), NF4Tensor)
    with pytest.raises(ValueError):
        quantize_weight("x", t, scheme="int3")


@needs_bnb
def test_weight_bytes_breakdown():
    from fastft.model import GptOssForTraining
    from fastft.model.testing import tiny_config
    from fastft.quant import weight_bytes

    cfg = tiny_config(hidden_size=64, intermediate_size=32)
    model = GptOssForTraining.from_config(cfg, dtype=torch.bfloat16)
    dense = weight_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(dense.values()) == total and dense["embedding_host"] == 0
    assert dense["lm_head"] == dense["embedding"] == 61 * 64 * 2
    assert dense["attention"] == 2 * 2 * (64 * 64 + 32 * 64) * 2  # 2 layers x (q, o: 64x64; k, v: 32x64), bf16
    for layer in model.model.layers:
        ex = layer.mlp.experts
        for w in ex.WEIGHTS:
            ex.set_quantized(w, quantize_mxfp4(ex.weight(w).detach()))
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, p)
            proj.set_quantized(quantize_nf4(proj.weight.detach()))
    model.model.embed_tokens.weight.requires_grad_(False)
    model.offload_embedding()
    q = weight_bytes(model)
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    assert q["experts"] == 2 * E * (H * 2 * I + I * H) * 17 // 32  # 4.25 bits per weight
    assert 0 < q["attention"] < dense["attention"] and q["embedding"] == 0
    assert q["embedding_host"] == dense["embedding"] and q["other"] == dense["other"] and q["lm_head"] == dense["lm_head"]


# ---------------------------------------------------------------------------------------------------------------------
# int8 rows (the lm_head)


def _rows_of_mixed_scale(R=37, C=53, dtype=torch.float32):
    w = torch.randn(R, C) * torch.logspace(-4, 1, R).unsqueeze(1)
    w[3] = 0.0  # an all-zero row
    w[5, 7] = -w[5].abs().max() * 2  # a negative absmax
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_roundtrip_bound(dtype):
    from fastft.quant import Int8RowsTensor

    w = _rows_of_mixed_scale(dtype=dtype)
    q = Int8RowsTensor.quantize(w, chunk_elems=200)  # 3 rows per chunk: exercises the chunk loop
    assert q.shape == (37, 53) and q.dtype == dtype and q.device == w.device
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32 and q.nbytes() == 37 * 53 + 37 * 4
    whole = Int8RowsTensor.quantize(w)
    assert torch.equal(q.data, whole.data) and torch.equal(q.scale, whole.scale)
    wf = w.float()
    absmax = wf.abs().amax(1)
    assert torch.equal(q.scale, absmax / 127)
    deq = q.dequantize()
    assert deq.dtype == torch.float32
    # round to nearest: |err| <= scale / 2 per element (plus the fp32 product's own rounding)
    assert ((deq - wf).abs() <= q.scale.unsqueeze(1) * (0.5 + 1e-4)).all()
    assert q.data.abs().max() <= 127 and (q.data.abs().amax(1)[absmax > 0] == 127).all()
    assert (q.data[3] == 0).all() and q.scale[3] == 0 and (deq[3] == 0).all()
    # decoding: one rounding of the fp32 product, into a fresh tensor or a given one, by slice or by index
    want = (q.data.float() * q.scale.unsqueeze(1)).to(torch.bfloat16)
    assert torch.equal(q.dequantize(torch.bfloat16), want)
    out = torch.empty(5, 53, dtype=torch.bfloat16)
    assert q.rows(slice(4, 9), out=out) is out and torch.equal(out, want[4:9])
    idx = torch.tensor([36, 0, 5, 5])
    assert torch.equal(q.rows(idx, torch.bfloat16), want[idx])
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), deq) and moved.nbytes() == q.nbytes()


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_match_bitsandbytes(dtype):
    from fastft.quant import Int8RowsTensor

    w = _rows_of_mixed_scale(61, 97, dtype)
    w[3] = torch.randn(97).to(dtype)  # bnb's CPU path gives NaN codes for a zero row: compared separately above
    codes, stats, outliers = bnbf.int8_vectorwise_quant(w.clone())
    q = Int8RowsTensor.quantize(w)
    assert outliers is None and torch.equal(q.data, codes)
    assert torch.equal(q.scale, stats / 127)


def test_int8_rows_stream_to_device_and_dtype():
    from fastft.quant import Int8RowsTensor, quantize_int8_rows

    w = torch.randn(19, 40)
    q = quantize_int8_rows(w, device="cpu", dtype=torch.bfloat16, chunk_elems=64)
    ref = Int8RowsTensor.quantize(w.bfloat16())  # cast first, as loading the weight in bf16 and quantising it
    assert q.dtype == torch.bfloat16 and torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
    with pytest.raises(ValueError, match="2-D floating"):
        Int8RowsTensor.quantize(torch.randn(4))
    with pytest.raises(ValueError, match="2-D floating"):
        Int8RowsTensor.quantize(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        Int8RowsTensor(torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(TypeError, match="scale"):
        Int8RowsTensor(torch.zeros(3, 4, dtype=torch.int8), torch.zeros(4))


def test_int8_policy_and_weight_bytes():
    from fastft.model import GptOssForTraining
    from fastft.model.testing import tiny_config
    from fastft.quant import Int8RowsTensor, weight_bytes

    assert scheme_for("lm_head.weight") == "none" and scheme_for("lm_head.weight", lm_head="int8") == "int8"
    t = torch.randn(6, 64)
    assert isinstance(quantize_weight("lm_head.weight", t, lm_head="int8"), Int8RowsTensor)
    assert quantize_weight("lm_head.weight", t, lm_head="bf16") is t
    cfg = tiny_config(hidden_size=64, intermediate_size=32)
    model = GptOssForTraining.from_config(cfg, dtype=torch.bfloat16)
    dense = weight_bytes(model)
    model.quantize_lm_head("int8")
    q = weight_bytes(model)
    assert q["lm_head"] == 61 * 64 + 61 * 4 and dense["lm_head"] == 61 * 64 * 2
    assert {k: v for k, v in q.items() if k != "lm_head"} == {k: v for k, v in dense.items() if k != "lm_head"}


def test_int8_codes_to_host_needs_cuda_scales():
    from fastft.quant import Int8RowsTensor

    q = Int8RowsTensor.quantize(torch.randn(5, 8))
    with pytest.raises(ValueError, match="CUDA"):
        q.codes_to_host()
    assert not q.codes_on_host and q.nbytes() == 5 * 8 + 5 * 4


def test_int8_rows_decode_given_codes_like_their_own():
    """rows(..., codes=) decodes codes handed in (the loss's streamed host codes) exactly as the held ones."""
    from fastft.quant import Int8RowsTensor

    q = Int8RowsTensor.quantize(torch.randn(9, 16))
    idx = torch.tensor([3, 0, 8, 3])
    assert torch.equal(q.rows(idx, torch.bfloat16, codes=q.data[idx].clone()), q.rows(idx, torch.bfloat16))
    assert torch.equal(q.rows(slice(2, 7), codes=q.data[2:7].clone()), q.rows(slice(2, 7)))
