"""End-to-end training step of gpt-oss-20b (random init, hub config) on one GPU: fastft vs the reference PEFT path.

One invocation measures, on the same token stream (packed 4096-token rows, lognormal document lengths):
  W1-qv            LoRA r16 a32 on q_proj, v_proj (dropout 0.1 both sides)
  W1-all           LoRA on attention + experts (PEFT target_parameters; dropout 0 both sides)
  W1-qv-qlora-ref  the stock QLoRA reference: bitsandbytes NF4 on the linears it can quantise, experts stay bf16
Reference = transformers GptOssForCausalLM + PEFT, bf16, eager attention with packed dict masks, default experts,
gradient checkpointing. fastft = its own model, `--kernels triton`, the trainer's CUDA layout (MXFP4 experts, NF4
attention, int8 lm_head, host embedding), gradient checkpointing.
Reports tokens/s (median step after a warm-up over every timed row), s/step, peak allocated GiB and MFU (FLOPs/token
= 4 N_active + attention, see flops_per_token) against a bf16 matmul ceiling measured in the same run.

    python benchmarks/bench_e2e.py [--quick] [--workloads W1-qv,W1-all,W1-qv-qlora-ref] [--steps 6]
        [--build '{"lm_head": "bf16", "offload_activations": true}']   # build_fastft options, kept in metrics.build
        [--build '[{"keep_gib": 0}, {"keep_gib": "auto"}]']           # several builds: a row each, one reference
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import record  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "gpt-oss-20b.json"


def token_stream(rows: int, row_len: int, vocab: int, seed: int = 0):
    """Packed rows: (input_ids [row_len], position_ids, cu_seqlens) with lognormal document lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        lengths, total = [], 0
        while total < row_len:
            n = int(min(row_len - total, max(16, math.exp(6.5 + 0.8 * torch.randn(1, generator=g).item()))))
            lengths.append(n)
            total += n
        ids = torch.randint(0, vocab, (row_len,), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        out.append((ids, pos, cu))
    return out


def active_params(cfg: dict) -> float:
    """Parameters a token passes through: 3.607e9 for gpt-oss-20b (attention 0.637e9 + four experts 2.389e9 +
    lm_head 0.579e9 + router)."""
    H, D, I, E, k = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"], cfg["num_local_experts"], \
        cfg["num_experts_per_tok"]
    attn = 2 * H * cfg["num_attention_heads"] * D + 2 * H * cfg["num_key_value_heads"] * D
    experts = k * 3 * H * I
    return cfg["num_hidden_layers"] * (attn + experts + H * E) + cfg["vocab_size"] * H


def flops_per_token(cfg: dict, cu: torch.Tensor) -> float:
    """4 N_active (forward + input-gradient backward; frozen base) + 3x forward attention score/value FLOPs."""
    D, Hq, W = cfg["head_dim"], cfg["num_attention_heads"], cfg["sliding_window"]
    lengths = (cu[1:] - cu[:-1]).tolist()
    T = sum(lengths)
    full = sum(n * (n + 1) / 2 for n in lengths)
    window = sum(sum(min(i + 1, W) for i in range(n)) for n in lengths)
    per_layer_pairs = {"full_attention": full, "sliding_attention": window}
    attn = sum(3 * 4 * D * Hq * per_layer_pairs[t] for t in cfg["layer_types"]) / T
    return 4 * active_params(cfg) + attn


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def hf_masks(pos: torch.Tensor, cu: torch.Tensor, window: int, dtype) -> dict:
    """Additive [1,1,T,T] masks for stock GPT-OSS, which ignores position_ids when it builds its own."""
    T = pos.numel()
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=pos.device), (cu[1:] - cu[:-1]).long())
    i, j = torch.arange(T, device=pos.device)[:, None], torch.arange(T, device=pos.device)[None, :]
    ok = (doc[:, None] == doc[None, :]) & (j <= i)
    neg = torch.finfo(dtype).min
    full = torch.zeros(T, T, dtype=dtype, device=pos.device).masked_fill(~ok, neg)
    slide = torch.zeros(T, T, dtype=dtype, device=pos.device).masked_fill(~(ok & (i - j < window)), neg)
    return {"full_attention": full[None, None], "sliding_attention": slide[None, None]}


def build_reference(cfg: dict, workload: str):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_cfg = GptOssConfig(**cfg)
    hf_cfg._attn_implementation = "eager"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = GptOssForCausalLM(hf_cfg)
    torch.set_default_dtype(torch.float32)
    if workload == "W1-qv-qlora-ref":
        _nf4_linears(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if workload == "W1-all":
        lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    else:
        lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lc)
    model.enable_input_require_grads()
    return model


def _nf4_linears(model):
    """Stock QLoRA: every nn.Linear bitsandbytes can take (attention projections; router and lm_head stay bf16 as
    PEFT/bnb users keep them) becomes bnb.nn.Linear4bit NF4; the 3-D experts stay bf16 (bnb cannot quantise them)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.cpu(), requires_grad=False)
            setattr(attn, name, q.cuda())
            del lin
    torch.cuda.empty_cache()


def reference_step(model, opt, row, cfg):
    ids, pos, cu = (t.cuda() for t in row)
    labels = ids.clone()
    labels[cu[:-1].long()] = -100  # nothing predicts across documents
    out = model(input_ids=ids[None], position_ids=pos[None], labels=labels[None],
                attention_mask=hf_masks(pos, cu, cfg["sliding_window"], torch.bfloat16))
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss


def build_fastft(cfg: dict, workload: str, attention: str = "nf4", offload_embedding: bool = True,
                 offload_activations: bool = False, lm_head: str = "int8", layer_graphs: bool = False,
                 keep_gib: float | str = 0, cap_gib: float | None = None):
    """fastft as the trainer runs it on CUDA: MXFP4 experts, NF4 attention projections (bitsandbytes' quantiser), the
    input embedding in host memory, lm_head int8 (one fp32 scale per row; "int8-host": its codes in pinned host
    memory, streamed by the loss). attention="bf16" /
    offload_embedding=False / lm_head="bf16" give the layout of earlier measurements; offload_activations keeps
    checkpointed layer inputs in host memory (long context); layer_graphs replays the decoder layers from CUDA graphs
    (fastft.model.layer_graphs, the trainer's default on one GPU; bench_e2e's default, not profile_e2e's, whose
    per-op attribution needs the eager launches); keep_gib: device memory for the experts' activations kept from the
    forward (layer_graphs; "auto" as the trainer's default, 0 recomputes everything); cap_gib: a device memory cap
    for this build (torch's per-process fraction, lifted after its measurement), e.g. 24 for a 24 GB card."""
    if lm_head not in ("bf16", "int8", "int8-host"):
        raise ValueError(f"lm_head must be bf16, int8 or int8-host, not {lm_head!r}")
    from fastft.backends import get_backend
    from fastft.model import LoraSettings, apply_lora
    from fastft.model.config import ModelConfig
    from fastft.model.gpt_oss import GptOssForTraining
    from fastft.model.testing import mxfp4_expert_placeholders
    from fastft.quant import quantize_mxfp4

    if cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    mcfg = ModelConfig.from_hf_dict(cfg)
    backend = get_backend("triton", "cuda")
    with torch.device("meta"):
        model = GptOssForTraining(mcfg, backend)
        mxfp4_expert_placeholders(model)  # 4-bit placeholders: the bf16 experts never exist in full
    model.to_dtype(torch.bfloat16).to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, mcfg.initializer_range)
        for layer in model.model.layers:  # random experts, one stack at a time, straight to MXFP4
            ex = layer.mlp.experts
            for name in ex.WEIGHTS:
                blocks = getattr(ex, f"{name}_blocks")
                E, fan_out, groups, _ = blocks.shape
                w = torch.randn(E, groups * 32, fan_out, device="cuda", dtype=torch.bfloat16)  # [E, in, out]
                q = quantize_mxfp4(w * mcfg.initializer_range)
                blocks.copy_(q.blocks)
                getattr(ex, f"{name}_scales").copy_(q.scales)
                del w, q
    if attention == "nf4":
        from fastft.quant import quantize_nf4

        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(layer.self_attn, name)
                proj.set_quantized(quantize_nf4(proj.weight.detach()))
        torch.cuda.empty_cache()
    if lm_head in ("int8", "int8-host"):
        model.quantize_lm_head("int8")  # the bf16 weight is dropped here, as the loader never keeps it
    if lm_head == "int8-host":
        model.lm_head_codes_to_host()
        torch.cuda.empty_cache()
    targets = "all" if workload == "W1-all" else "qv"
    apply_lora(model, LoraSettings(targets=targets, r=16, alpha=32, dropout=0.0 if workload == "W1-all" else 0.1,
                                   dtype=torch.bfloat16))
    if offload_embedding:
        model.offload_embedding()
    if offload_activations:
        model.enable_gradient_checkpointing(True, offload=True)
    else:
        model.enable_gradient_checkpointing(True)
    model.use_layer_graphs(layer_graphs, keep_gib=keep_gib)
    model.train()
    return model, backend


def fastft_step(model, opt, row, cfg):
    ids, pos, cu = (t.cuda() for t in row)
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    loss = model(ids, pos, cu, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def measure(step_fn, model, rows, cfg, steps: int, warmup: int) -> dict:
    """Median step time of `steps` steps over the rows, after a warm-up that runs every row once and then `warmup`
    more steps. A row's document count can select kernel specialisations (fastft's Triton kernels, the reference's
    masks) that the first rows did not need, and their compilation must stay out of the timings (H200, fresh
    host: with two warm-up steps on new rows, timed W1-qv steps took 839 and 681 ms against ~265 after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(len(rows) + warmup):
        loss = step_fn(model, opt, rows[i % len(rows)], cfg)
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_fn(model, opt, rows[i % len(rows)], cfg)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # graph replays allocate nothing, so the reserved peak (graph pools included) is reported beside the allocated one
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "loss": float(loss.detach())}


def run_one(build, step_fn, cfg, workload, rows, steps, warmup) -> dict:
    """Builds, measures and drops one model; the next one starts from an empty GPU (checked, and reported)."""
    gc.collect()
    torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated() / 2**30
    built = build(cfg, workload)
    model, extra = (built if isinstance(built, tuple) else (built, None))
    try:
        result = measure(step_fn, model, rows, cfg, steps, warmup)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)  # a build's cap_gib ends with it
    result["leftover_gib_before_build"] = leftover
    # per captured size: (layers keeping h, layers keeping everything, layers keeping h on the host, its share)
    kept = list(getattr(model, "kept_layers", dict)().values())
    result["kept_layers"] = max((a + b for a, b, *_ in kept), default=0)
    result["whole_layers"] = max((b for _, b, *_ in kept), default=0)
    result["host_h_layers"] = max((k[2] for k in kept), default=0)
    result["host_h_share"] = max((k[3] for k in kept), default=0.0)
    if extra is not None:
        result["sources"] = extra.sources
    del model, built
    gc.collect()  # PEFT models hold reference cycles: without this their weights outlive them
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 steps: a smoke run")
    ap.add_argument("--workloads", default="W1-qv,W1-all,W1-qv-qlora-ref")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps after one step on every timed row")
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--build", default="{}", help='JSON options for build_fastft, e.g. {"attention": "bf16"}, or a '
                    'list of such: one fastft row each, all against the same reference measurement')
    args = ap.parse_args()
    builds = json.loads(args.build)
    defaults = {"attention": "nf4", "offload_embedding": True, "offload_activations": False, "lm_head": "int8",
                "layer_graphs": True, "keep_gib": "auto"}
    builds = [defaults | b for b in (builds if isinstance(builds, list) else [builds])]
    cfg = json.loads(CONFIG.read_text())
    if args.quick:
        cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
        args.steps, args.warmup = 2, 1
    rows = token_stream(args.steps, args.row_len, cfg["vocab_size"])
    fpt = statistics.mean(flops_per_token(cfg, r[2]) for r in rows)
    ceiling = matmul_tflops()
    print(f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s; {fpt / 1e9:.2f} GFLOP/token", flush=True)
    for workload in args.workloads.split(","):
        ref_cell = "W1-qv" if workload == "W1-qv-qlora-ref" else workload
        fasts = []
        if workload != "W1-qv-qlora-ref":
            for build_kw in builds:
                fasts.append(run_one(lambda c, w: build_fastft(c, w, **build_kw), fastft_step, cfg, ref_cell, rows,
                                     args.steps, args.warmup))
                print(workload, "fastft", build_kw, fasts[-1], flush=True)
        ref = {}
        if not args.skip_reference:
            try:
                ref = run_one(build_reference, reference_step, cfg, workload, rows, args.steps, args.warmup)
            except torch.OutOfMemoryError as e:
                ref = {"error": f"OOM: {e}"[:200]}
                gc.collect()
                torch.cuda.empty_cache()
            print(workload, "reference", ref, flush=True)
        for build_kw, fast in zip(builds, fasts or [{}]):
            record("e2e", _metrics(workload, args, cfg, rows, fpt, ceiling, build_kw, fast, ref))


def _metrics(workload, args, cfg, rows, fpt, ceiling, build_kw, fast, ref) -> dict:
    tok = args.row_len
    m = {"workload": workload, "tokens_per_row": tok, "layers": cfg["num_hidden_layers"],
         "warmup_steps": len(rows) + args.warmup,
         "matmul_tflops": ceiling, "flops_per_token": fpt, "build": build_kw}
    if fast:
        m.update(fastft_tok_s=tok / fast["step_s"], fastft_s_per_step=fast["step_s"], peak_gib=fast["peak_gib"],
                 peak_reserved_gib=fast["peak_reserved_gib"], kept_activation_layers=fast["kept_layers"],
                 layers_without_recompute=fast["whole_layers"], host_h_layers=fast["host_h_layers"],
                 host_h_share=fast["host_h_share"],
                 mfu=tok / fast["step_s"] * fpt / (ceiling * 1e12), kernels=fast["sources"],
                 fastft_loss=fast["loss"], fastft_leftover_gib=fast["leftover_gib_before_build"])
    if ref.get("step_s"):
        m.update(reference_tok_s=tok / ref["step_s"], reference_s_per_step=ref["step_s"],
                 reference_peak_gib=ref["peak_gib"], reference_peak_reserved_gib=ref["peak_reserved_gib"],
                 reference_loss=ref["loss"],
                 reference_leftover_gib=ref["leftover_gib_before_build"])
    elif ref:
        m["reference_error"] = ref.get("error")
    if fast and ref.get("step_s"):
        m["speedup_vs_reference"] = ref["step_s"] / fast["step_s"]
    return m


if __name__ == "__main__":
    main()
