"""Convergence agreement: fastft's loss curve against the reference path's (transformers + PEFT) on a learnable task.

The task: a fixed set of random token patterns; every document strings a few of them together in random order, and
rows pack documents. Within a pattern every token is predictable from the ones before it, so a model that memorises
the patterns drives the loss towards ln(n_patterns) / pattern_len per token (the pattern switches stay random).

Both sides hold the same base weights, the same LoRA init (PEFT's A/B copied into fastft), see the same rows and run
AdamW with the same settings. Agreement criterion (``agreement``): both curves are smoothed by a trailing 5-step
moving average, and max over steps of |fastft - reference| / reference must stay within 2 %; the raw per-step maximum
is reported beside it.

On the GPU (this script): gpt-oss-20b at full size, random init, bf16. The reference's experts and attention weights are
projected onto fastft's 4-bit grids (experts MXFP4, attention NF4 as fastft's fast path holds them), so both sides
compute with identical weights and only the arithmetic differs. Triton backend, gradient checkpointing on both sides.
tests/test_convergence.py runs the same code at tiny size on the CPU (fp32, torch backend).

    python benchmarks/bench_convergence.py [--quick] [--steps 100] [--row-len 1024] [--lr 2e-4,5e-4]
        [--attention nf4|bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import record  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "gpt-oss-20b.json"
ATTENTION_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------------------
# The learnable task and the agreement criterion


def pattern_rows(steps: int, row_len: int, vocab: int, n_patterns: int = 32, pattern_len: int = 16,
                 doc_patterns: int = 4, seed: int = 0) -> list[tuple]:
    """One packed row per step: (input_ids [row_len], position_ids, cu_seqlens int32). Documents are doc_patterns
    patterns drawn at random (the last document of a row is cut short to fit)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, vocab, (n_patterns, pattern_len), generator=g)
    rows = []
    for _ in range(steps):
        docs, total = [], 0
        while total < row_len:
            pick = torch.randint(0, n_patterns, (doc_patterns,), generator=g)
            doc = patterns[pick].reshape(-1)[: row_len - total]
            docs.append(doc)
            total += doc.numel()
        lengths = [d.numel() for d in docs]
        ids = torch.cat(docs)
        pos = torch.cat([torch.arange(n) for n in lengths])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        rows.append((ids, pos, cu))
    return rows


def labels_for(ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """HF-style unshifted labels: each document's first token is -100, so nothing predicts across documents."""
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    return labels


def moving_average(curve: list[float], window: int) -> list[float]:
    """Trailing mean over full windows only: len(curve) - window + 1 values."""
    return [statistics.fmean(curve[i - window + 1: i + 1]) for i in range(window - 1, len(curve))]


def agreement(fastft: list[float], reference: list[float], window: int = 5) -> dict:
    """max / mean over steps of |a - b| / b on the window-smoothed curves, and the raw per-step max."""
    rel = lambda a, b: [abs(x - y) / abs(y) for x, y in zip(a, b)]  # noqa: E731
    smooth = rel(moving_average(fastft, window), moving_average(reference, window))
    raw = rel(fastft, reference)
    return {"max_rel_diff": max(smooth), "mean_rel_diff": statistics.fmean(smooth), "raw_max_rel_diff": max(raw),
            "smoothing_window": window}


# ---------------------------------------------------------------------------------------------------------------------
# Building the two sides from one set of weights


def hf_masks(cu: torch.Tensor, window: int | None, dtype, device) -> dict:
    """Additive [1,1,T,T] masks for stock GPT-OSS (it ignores position_ids when it builds its own): causal within
    documents, and within the sliding window for sliding layers."""
    cu = cu.to(device)
    T = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), (cu[1:] - cu[:-1]).long())
    i, j = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    ok = (doc[:, None] == doc[None, :]) & (j <= i)
    slide = ok & (i - j < window) if window is not None else ok
    neg = torch.finfo(dtype).min

    def additive(allowed):
        return torch.zeros(T, T, dtype=dtype, device=device).masked_fill(~allowed, neg)[None, None]

    return {"full_attention": additive(ok), "sliding_attention": additive(slide)}


def random_hf(cfg: dict, device, dtype):
    """transformers' GptOssForCausalLM with its own random init, eager attention, built straight on the device."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_cfg = GptOssConfig(**cfg)
    hf_cfg._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GptOssForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model


@torch.no_grad()
def project_onto_4bit(hf, attention: str = "nf4") -> dict:
    """Rounds the reference's experts to MXFP4 (and attention weights to NF4 unless attention="bf16") in place and
    returns the 4-bit holders by parameter name, so fastft can hold the very values the reference computes with.
    MXFP4 values are exact in bf16; NF4 ones are rounded to the reference's dtype once (bnb's own dequantisation)."""
    from fastft.quant import quantize_mxfp4, quantize_nf4

    held = {}
    for i, layer in enumerate(hf.model.layers):
        ex = layer.mlp.experts
        for name in EXPERT_WEIGHTS:
            w = getattr(ex, name)
            q = quantize_mxfp4(w.data)
            w.data.copy_(q.dequantize(w.dtype))
            held[f"model.layers.{i}.mlp.experts.{name}"] = q
        if attention == "nf4":
            for name in ATTENTION_WEIGHTS:
                lin = getattr(layer.self_attn, name)
                q = quantize_nf4(lin.weight.data)
                lin.weight.data.copy_(q.dequantize(lin.weight.dtype))
                held[f"model.layers.{i}.self_attn.{name}.weight"] = q
    return held


def fastft_from_hf(hf, backend, held: dict | None = None):
    """fastft's GptOssForTraining with the HF model's weights (copied by name; names are shared), in the HF model's
    dtype and device. Weights in ``held`` (from project_onto_4bit) are held 4-bit instead; 4-bit experts never exist
    densely on fastft's side."""
    from fastft.model.config import ModelConfig
    from fastft.model.gpt_oss import GptOssForTraining
    from fastft.mxfp4 import MXFP4Tensor

    held = held or {}
    p0 = next(hf.parameters())
    with torch.device("meta"):
        model = GptOssForTraining(ModelConfig.from_hf_dict(hf.config.to_dict()), backend)
        for i, layer in enumerate(model.model.layers):
            for name in EXPERT_WEIGHTS:
                q = held.get(f"model.layers.{i}.mlp.experts.{name}")
                if q is not None:  # meta placeholders of the right shapes, filled below
                    layer.mlp.experts.set_quantized(name, MXFP4Tensor(torch.empty_like(q.blocks, device="meta"),
                                                                      torch.empty_like(q.scales, device="meta")))
    model.to_dtype(p0.dtype).to_empty(device=p0.device)
    hf_state = hf.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(hf_state[name])
        for i, layer in enumerate(model.model.layers):
            for name in EXPERT_WEIGHTS:
                q = held.get(f"model.layers.{i}.mlp.experts.{name}")
                if q is not None:
                    getattr(layer.mlp.experts, f"{name}_blocks").copy_(q.blocks)
                    getattr(layer.mlp.experts, f"{name}_scales").copy_(q.scales)
            for name in ATTENTION_WEIGHTS:
                q = held.get(f"model.layers.{i}.self_attn.{name}.weight")
                if q is not None:
                    getattr(layer.self_attn, name).set_quantized(q)
    return model


def add_matching_lora(hf, ours, r: int, alpha: float):
    """PEFT LoRA (q_proj, v_proj, dropout 0) on the HF model, and fastft's on ours with PEFT's initial A/B copied
    in. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    from fastft.model import LoraSettings, apply_lora
    from fastft.model.adapter import peft_state

    peft = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    apply_lora(ours, LoraSettings(targets="qv", r=r, alpha=alpha, dropout=0.0))  # fp32 LoRA, as PEFT's upcast ones
    theirs = {n.replace(".default", ""): p for n, p in peft.named_parameters() if p.requires_grad}
    mine = peft_state(ours)
    if set(theirs) != set(mine):
        raise RuntimeError(f"LoRA names differ: {sorted(set(theirs) ^ set(mine))[:4]}")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(theirs[name])
    return peft


# ---------------------------------------------------------------------------------------------------------------------
# Training both sides


def fastft_loss(model, row, device):
    ids, pos, cu = (t.to(device) for t in row)
    return model(ids, pos, cu, labels_for(ids, cu))


def reference_loss(peft, row, device):
    ids, pos, cu = (t.to(device) for t in row)
    window = peft.config.sliding_window
    masks = hf_masks(cu, window, next(peft.parameters()).dtype, device)
    return peft(input_ids=ids[None], position_ids=pos[None], labels=labels_for(ids, cu)[None],
                attention_mask=masks).loss


def train_curve(loss_fn, model, rows, lr: float, device, weight_decay: float = 0.0, log_every: int = 0,
                tag: str = "") -> tuple[list[float], float]:
    """One optimizer step per row; returns (the per-step losses, the mean seconds per step after the first)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses, times = [], []
    for step, row in enumerate(rows):
        t0 = time.perf_counter()
        loss = loss_fn(model, row, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host sync per step: the timing below is honest
        times.append(time.perf_counter() - t0)
        if log_every and (step % log_every == 0 or step == len(rows) - 1):
            print(f"{tag} step {step}: loss {losses[-1]:.4f} ({times[-1]:.2f} s)", flush=True)
    del opt
    return losses, statistics.fmean(times[1:]) if len(times) > 1 else times[0]


# ---------------------------------------------------------------------------------------------------------------------


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 layers, 10 steps: a smoke run")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--row-len", type=int, default=1024)
    ap.add_argument("--lr", default="2e-4,5e-4",
                    help="AdamW learning rate(s), comma-separated: one run of both sides and one row per value, each "
                         "from the same initial LoRA")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--patterns", type=int, default=32)
    ap.add_argument("--pattern-len", type=int, default=16)
    ap.add_argument("--attention", choices=("nf4", "bf16"), default="nf4",
                    help="how fastft holds the attention weights (nf4 = the fast path); the reference is projected "
                         "onto the same values")
    ap.add_argument("--kernels", default="triton")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=CONFIG, help="an HF config.json (default: gpt-oss-20b)")
    ap.add_argument("--device", default="cuda", help="cpu: an fp32 run of this script's logic on a small --config")
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    if args.quick:
        cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
        args.steps = min(args.steps, 10)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from fastft.backends import get_backend

    backend = get_backend(args.kernels if device == "cuda" else "torch", device)
    rows = pattern_rows(args.steps, args.row_len, cfg["vocab_size"], args.patterns, args.pattern_len, seed=args.seed)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    hf = random_hf(cfg, device, dtype)
    held = project_onto_4bit(hf, args.attention)
    ours = fastft_from_hf(hf, backend, held)
    del held
    peft = add_matching_lora(hf, ours, args.r, args.alpha)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.enable_input_require_grads()
    ours.enable_gradient_checkpointing(True)
    lora_dtypes = sorted({str(p.dtype) for p in peft.parameters() if p.requires_grad})
    initial = [{n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad} for m in (ours, peft)]
    _free()
    gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    print(f"built both sides in {time.perf_counter() - t0:.0f} s; {gib:.1f} GiB allocated; kernels {backend.sources}; "
          f"reference LoRA dtype {lora_dtypes}", flush=True)

    every = max(1, args.steps // 10)
    floor = torch.log(torch.tensor(float(args.patterns))).item() / args.pattern_len
    for lr in (float(x) for x in args.lr.split(",")):
        for model, start in zip((ours, peft), initial):  # every run starts from the same LoRA
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(start[n])
        fast, fast_s = train_curve(fastft_loss, ours, rows, lr, device, log_every=every, tag=f"lr {lr:g} fastft")
        _free()
        ref, ref_s = train_curve(reference_loss, peft, rows, lr, device, log_every=every, tag=f"lr {lr:g} reference")
        _free()
        agree = agreement(fast, ref)
        record("convergence", {
            "steps": args.steps, "tokens_per_row": args.row_len, "layers": cfg["num_hidden_layers"], "lr": lr, **agree,
            "within_2pct": agree["max_rel_diff"] <= 0.02,
            "initial_loss": statistics.fmean(ref[:5]), "fastft_final_loss": statistics.fmean(fast[-5:]),
            "reference_final_loss": statistics.fmean(ref[-5:]), "task_floor_loss": floor,
            "weight_decay": 0.0, "r": args.r, "alpha": args.alpha, "patterns": args.patterns,
            "pattern_len": args.pattern_len,
            "attention": args.attention, "experts": "mxfp4", "dtype": str(dtype).removeprefix("torch."),
            "kernels": backend.sources,
            "reference_lora_dtype": ",".join(lora_dtypes), "fastft_s_per_step": fast_s, "reference_s_per_step": ref_s,
            "fastft_curve": [round(x, 5) for x in fast], "reference_curve": [round(x, 5) for x in ref],
        })


if __name__ == "__main__":
    main()
