"""Command-line options -> TrainConfig. Bad values end in a one-line message and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "openai/gpt-oss-20b"


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)
    model: str = DEFAULT_MODEL
    output_dir: str = "fastft-out"
    overwrite: bool = False
    resume: bool = False
    validate_only: bool = False
    # data
    max_seq_len: int = 4096
    train_on_all: bool = False
    skip_invalid: bool = False
    overlong: str = "truncate"
    drop_duplicates: bool = False
    eval_fraction: float = 0.0
    # optimisation
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    batch_tokens: int | None = None
    micro_batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    keep_activations: str | float = "auto"  # GiB of activations kept instead of recomputed, "auto" or "off"
    # base weights (auto: the 4-bit fast path on CUDA with the triton kernels, as loaded elsewhere)
    experts: str = "auto"
    linears: str = "auto"
    embedding: str = "auto"
    lm_head: str = "auto"
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: str = "qv"
    # engine
    kernels: str = "auto"
    cuda_graphs: str = "auto"
    dtype: str = "auto"
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage; None: 2 with several ranks, no DeepSpeed on one
    deepspeed: str | None = None
    local_rank: int = -1
    # outputs
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    progress: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class CliError(Exception):
    """A bad command line: printed as one line, exit code 2."""


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _nonneg_int(text):
    v = _positive_int(text) if text != "0" else 0
    return v


def _keep_gib(text):
    if text in ("auto", "off"):
        return text
    return _float_in(0.0, 1e6)(text)


def _float_in(lo, hi, lo_open=False, hi_open=True):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if v != v or (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {text}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + message, exit 2 (a usage error), without its long prefix
        self.print_usage(sys.stderr)
        print(f"fastft: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="fastft", description="LoRA fine-tuning of GPT-OSS from JSONL files.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="+", help="JSONL file(s) (.jsonl or .jsonl.gz)")
    p.add_argument("--model", default=d.model, help="hub id, local HF checkpoint folder, or 'tiny' (built-in)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output dir that is not a resume target")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--validate-only", action="store_true", help="check the data, print the report and exit")
    g = p.add_argument_group("data")
    g.add_argument("--max-seq-len", type=_positive_int, default=d.max_seq_len, help="packed row length in tokens")
    g.add_argument("--train-on-all", action="store_true", help="train on every token, not only assistant replies")
    g.add_argument("--skip-invalid", action="store_true", help="skip invalid rows (reported) instead of refusing")
    g.add_argument("--overlong", choices=("truncate", "drop"), default=d.overlong,
                   help="what to do with conversations longer than --max-seq-len")
    g.add_argument("--drop-duplicates", action="store_true", help="drop exact duplicate conversations")
    g.add_argument("--eval-fraction", type=_float_in(0.0, 1.0), default=d.eval_fraction,
                   help="fraction of conversations held out for eval loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs)
    g.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="packed rows per optimizer step")
    g.add_argument("--batch-tokens", type=_positive_int, default=None,
                   help="global batch in tokens (overrides --batch-size: ceil(tokens / max-seq-len) rows)")
    g.add_argument("--micro-batch-size", type=_positive_int, default=d.micro_batch_size,
                   help="packed rows per forward pass per GPU (the rest is gradient accumulation)")
    g.add_argument("--learning-rate", "--lr", type=_float_in(0.0, 1.0, lo_open=True), default=d.learning_rate)
    g.add_argument("--weight-decay", type=_float_in(0.0, 1.0), default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=_float_in(0.0, 1.0), default=d.warmup_ratio)
    g.add_argument("--max-grad-norm", type=_float_in(0.0, 1e6), default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep checkpointed layer inputs in host memory (long sequences on small cards)")
    g.add_argument("--keep-activations", type=_keep_gib, default=d.keep_activations, metavar="auto|off|GIB",
                   help="GPU memory for activations kept from the forward instead of recomputed: first the "
                        "experts' gate_up outputs (46 KB per token and layer for gpt-oss-20b; ~15 %% of a step), "
                        "then whole layers; auto = what the GPU has free after the first step, less a margin; "
                        "off = recompute everything (least memory); with CUDA graphs")
    g = p.add_argument_group("base weights")
    g.add_argument("--experts", choices=("auto", "dense", "mxfp4", "nf4"), default=d.experts,
                   help="expert storage; auto = mxfp4 on CUDA with the triton kernels, the checkpoint's dtype elsewhere")
    g.add_argument("--linears", choices=("auto", "dense", "nf4"), default=d.linears,
                   help="attention projections; auto = nf4 (bitsandbytes) on CUDA with the triton kernels")
    g.add_argument("--embedding", choices=("auto", "device", "host"), default=d.embedding,
                   help="input embedding placement; auto = host memory on CUDA (a step reads only its own rows)")
    g.add_argument("--lm-head", choices=("auto", "bf16", "int8"), default=d.lm_head,
                   help="lm_head storage; auto = int8 (one fp32 scale per vocabulary row) on CUDA with the triton "
                        "kernels, bf16 elsewhere")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=_positive_int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=_float_in(0.0, 1e6, lo_open=True), default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=_float_in(0.0, 1.0), default=d.lora_dropout)
    g.add_argument("--lora-targets", default=d.lora_targets,
                   help="qv | attn (q,k,v,o) | all (attention + experts) | comma list of module names")
    g = p.add_argument_group("engine")
    g.add_argument("--kernels", choices=("auto", "torch", "triton"), default=d.kernels,
                   help="auto = triton on CUDA, torch reference elsewhere")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default=d.cuda_graphs,
                   help="replay the decoder layers of a step from CUDA graphs (the host then issues 48 launches, not "
                        "~1,200); auto = on with the triton kernels on one GPU with gradient checkpointing")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d.dtype, help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=d.zero_stage,
                   help="DeepSpeed ZeRO stage (default: 2 with several ranks; one process trains without DeepSpeed's "
                        "engine unless this or --deepspeed is given)")
    g.add_argument("--deepspeed", default=None, metavar="CFG.json", help="DeepSpeed config overriding the generated one")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    g = p.add_argument_group("outputs")
    g.add_argument("--save-every", type=_positive_int, default=d.save_every, help="checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=d.keep_checkpoints)
    g.add_argument("--eval-every", type=_nonneg_int, default=d.eval_every, help="eval every N steps (0: each epoch)")
    g.add_argument("--log-every", type=_positive_int, default=d.log_every)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv=None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.deepspeed is not None:
        path = Path(cfg.deepspeed)
        if not path.is_file():
            raise CliError(f"--deepspeed {cfg.deepspeed}: no such file")
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CliError(f"--deepspeed {cfg.deepspeed}: not valid JSON ({e})")
    from fastft.model.lora import resolve_targets

    try:
        resolve_targets(cfg.lora_targets)
    except ValueError as e:
        raise CliError(f"--lora-targets {cfg.lora_targets!r}: {e}")
    return cfg
