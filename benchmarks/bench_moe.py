"""One GPT-OSS MoE block, forward + backward: fastft's Triton kernel on 4-bit experts vs transformers grouped_mm.

Rivals (same invocation, same inputs): transformers 5.x GptOssMLP with config._experts_implementation = "grouped_mm"
on bf16 experts, with PEFT target_parameters LoRA (r=16, alpha=32) and without LoRA (experts frozen, so both sides
compute dX only). fastft runs with MXFP4 experts (and bf16 experts as a second row), LoRA r=16 on both projections.

    python benchmarks/bench_moe.py            # T=16384, gpt-oss-20b shapes
    python benchmarks/bench_moe.py --quick    # smoke run
    python benchmarks/bench_moe.py --bf16-experts   # adds fastft rows on bf16 experts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels.moe import moe  # noqa: E402
import fastft.kernels.moe as moe_module  # noqa: E402
from fastft.mxfp4 import MXFP4Tensor  # noqa: E402

H = I = 2880
E, K, R, ALPHA = 32, 4, 16, 32
PEAK_TFLOPS = 790.0  # measured bf16 dense matmul on this workplace's H200


def hf_mlp(lora: bool, weights: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "grouped_mm"  # read by use_experts_implementation's forward at call time
    with torch.device("cuda"):
        mlp = GptOssMLP(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, t in weights.items():
            mlp.get_parameter(name).copy_(t)
    for p in mlp.parameters():
        p.requires_grad_(False)
    if lora:
        mlp = get_peft_model(mlp, LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                             r=R, lora_alpha=ALPHA, target_modules=[]))
        for n, p in mlp.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # PEFT starts B at zero; timing is the same, but be honest
    return mlp


def lora_factors(n_in, n_out):
    A = (torch.randn(R * E, n_in, device="cuda") / n_in**0.5).requires_grad_()
    B = (torch.randn(n_out, R * E, device="cuda") * 0.02).requires_grad_()
    return A, B, ALPHA / R


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--bf16-experts", action="store_true", help="also time fastft on bf16 experts (more compiles)")
    args = ap.parse_args()
    T = args.tokens or (2048 if args.quick else 16384)
    iters, warmup = (3, 1) if args.quick else (10, 3)
    torch.manual_seed(0)

    # MXFP4 experts with realistic scales; the bf16 rivals use exactly their dequantised values
    gu_q = MXFP4Tensor(torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, device="cuda"),
                       torch.randint(118, 122, (E, 2 * I, H // 32), dtype=torch.uint8, device="cuda"))
    dn_q = MXFP4Tensor(torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, device="cuda"),
                       torch.randint(118, 122, (E, H, I // 32), dtype=torch.uint8, device="cuda"))
    weights = {
        "router.weight": torch.randn(E, H, device="cuda") / H**0.5,
        "router.bias": torch.randn(E, device="cuda") * 0.1,
        "experts.gate_up_proj": gu_q.dequantize(torch.bfloat16),
        "experts.gate_up_proj_bias": torch.randn(E, 2 * I, device="cuda") * 0.1,
        "experts.down_proj": dn_q.dequantize(torch.bfloat16),
        "experts.down_proj_bias": torch.randn(E, H, device="cuda") * 0.1,
    }
    bf = {n: t.to(torch.bfloat16) for n, t in weights.items()}
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def step_hf(model):
        params = [x] + [p for p in model.parameters() if p.requires_grad]
        def fn():
            out, _ = model(x[None])
            torch.autograd.grad(out[0], params, g)
        return fn

    lora_gu, lora_d = lora_factors(H, 2 * I), lora_factors(I, H)

    def step_fastft(gate_up, down, lora):
        def fn():
            out = moe(x, bf["router.weight"], bf["router.bias"], K, gate_up, bf["experts.gate_up_proj_bias"], down,
                      bf["experts.down_proj_bias"], lora_gu if lora else None, lora_d if lora else None)
            params = [x] + ([*lora_gu[:2], *lora_d[:2]] if lora else [])
            torch.autograd.grad(out, params, g)
        return fn

    t0 = time.perf_counter()

    def log(msg):
        print(f"[bench_moe {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # a rival that fails (OOM, an API change) leaves None in its columns instead of killing the fastft rows
    results, notes = {}, []
    for name, lora in (("grouped_mm_peft", True), ("grouped_mm", False)):
        try:
            step = step_hf(hf_mlp(lora, weights))
            results[name] = (time_ms(step, warmup, iters), extra_peak_gib(step))
            log(f"{name}: {results[name][0]:.2f} ms")
        except Exception as exc:  # noqa: BLE001
            results[name] = (None, None)
            notes.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
            log(notes[-1])
        step = None
        torch.cuda.empty_cache()

    # sanity: with the same bf16 router and the dequantised experts both sides take the same routing, so the
    # no-LoRA outputs agree to bf16 rounding (~0.5%)
    rel_err = None
    try:
        with torch.no_grad():
            ref = hf_mlp(False, weights)(x[None])[0][0].float()
            mine = moe(x, bf["router.weight"], bf["router.bias"], K, gu_q, bf["experts.gate_up_proj_bias"], dn_q,
                       bf["experts.down_proj_bias"]).float()
        rel_err = ((mine - ref).norm() / ref.norm()).item()
        log(f"fastft vs grouped_mm output rel err {rel_err:.2e} (includes fastft's first compile)")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"check: {type(exc).__name__}: {str(exc)[:160]}")
        log(notes[-1])
    torch.cuda.empty_cache()

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b is not None else None

    flops = 12.0 * T * K * H * I  # fwd: gate_up 4·S·H·I + down 2·S·I·H; bwd dX: the same again (S = T·k)
    rows = [("mxfp4", gu_q, dn_q)]
    if args.bf16_experts:
        rows.append(("bf16", bf["experts.gate_up_proj"], bf["experts.down_proj"]))
    for expert_format, gate_up, down in rows:
        for lora in ((True,) if args.quick else (True, False)):
            step = step_fastft(gate_up, down, lora)
            ms = time_ms(step, warmup, iters)
            peak = extra_peak_gib(step)
            log(f"fastft {expert_format} lora={lora}: {ms:.2f} ms")
            peft_ms, peft_gib = results["grouped_mm_peft"]
            gmm_ms, gmm_gib = results["grouped_mm"]
            record("moe", {
                "T": T, "H": H, "I": I, "E": E, "top_k": K, "r": R, "lora": lora, "experts": expert_format,
                "bm": moe_module._row_tile(T * K, E, moe_module._register_serves(x, gate_up, down)),
                "fastft_ms": round(ms, 3), "grouped_mm_peft_ms": peft_ms and round(peft_ms, 3),
                "grouped_mm_ms": gmm_ms and round(gmm_ms, 3),
                "speedup_vs_rival": ratio(peft_ms if lora else gmm_ms, ms),
                "speedup_vs_peft": ratio(peft_ms, ms), "speedup_vs_grouped_mm": ratio(gmm_ms, ms),
                "fastft_tflops": round(flops / ms / 1e9, 1), "peak_tflops": PEAK_TFLOPS,
                "fastft_peak_gib": round(peak, 3), "grouped_mm_peft_peak_gib": peft_gib and round(peft_gib, 3),
                "grouped_mm_peak_gib": gmm_gib and round(gmm_gib, 3), "rel_err_vs_grouped_mm": rel_err,
                "quick": args.quick, **({"note": "; ".join(notes)} if notes else {}),
            })
            step = None
            torch.cuda.empty_cache()
    for key, config in moe_module._grouped_gemm_kernel.cache.items():
        log(f"autotuned {key[:5]}: {config}")
    log("done")


if __name__ == "__main__":
    main()
