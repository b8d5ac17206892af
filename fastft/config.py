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


def _seed(text):
    # numpy's generators refuse negative seeds and torch.manual_seed ones past 2**64: one range for both
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" where it tells something: not on flags (their name says what they switch) nor on
    options without a default (their help says what happens without them); the epilog keeps its lines."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


EPILOG = """\
examples:
  python fastft/train.py data.jsonl --model tiny                  # the built-in tiny model, any machine
  python fastft/train.py data.jsonl --model /path/to/gpt-oss-20b --output-dir out
  python fastft/train.py data.jsonl --output-dir out --resume     # continue a stopped or killed run
  deepspeed --num_gpus 8 fastft/train.py data.jsonl --model /path/to/gpt-oss-20b

exit status: 0 trained (or --validate-only: the data is clean); 1 errors in the data, the model or the run;
2 a bad command line or option value; 130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint (--resume
continues), or before training started (nothing written). Environment: FASTFT_CACHE, the dataset cache folder
(default ~/.cache/fastft)."""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="python fastft/train.py", formatter_class=_HelpFormatter, epilog=EPILOG,
                description="LoRA fine-tuning of GPT-OSS from JSONL files; writes a PEFT adapter to --output-dir.")
    p.add_argument("data", nargs="+", help="JSONL file(s), .jsonl or .jsonl.gz (README.md lists the row shapes)")
    p.add_argument("--model", default=d.model, metavar="ID|DIR",
                   help="hub id (from the local Hugging Face cache: fastft never downloads), a local Hugging Face "
                        "model folder, or 'tiny' (built in)")
    p.add_argument("--output-dir", default=d.output_dir, metavar="DIR",
                   help="where the adapter, checkpoints, metrics and metadata.json go")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --output-dir, replacing what an earlier fastft run wrote there (it "
                        "is kept aside until this run finishes, and put back if this run fails before its first "
                        "checkpoint); other files stay")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (the same data and options)")
    p.add_argument("--validate-only", action="store_true", help="check the data, print the report and exit")
    g = p.add_argument_group("data")
    g.add_argument("--max-seq-len", type=_positive_int, default=d.max_seq_len, metavar="N",
                   help="packed row length in tokens (also the longest a conversation may be)")
    g.add_argument("--train-on-all", action="store_true", help="train on every token, not only assistant replies")
    g.add_argument("--skip-invalid", action="store_true",
                   help="train on the valid rows when some have errors (the report lists those skipped)")
    g.add_argument("--overlong", choices=("truncate", "drop"), default=d.overlong,
                   help="conversations longer than --max-seq-len: keep their first tokens, or drop them")
    g.add_argument("--drop-duplicates", action="store_true",
                   help="drop exact duplicate conversations (kept otherwise; counted either way)")
    g.add_argument("--eval-fraction", type=_float_in(0.0, 1.0), default=d.eval_fraction, metavar="F",
                   help="share of conversations held out to measure eval loss, in [0, 1); 0 = no eval set")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, metavar="N", help="passes over the data")
    g.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="stop after at most N optimizer steps (default: as many as --epochs takes)")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, metavar="ROWS",
                   help="packed rows per optimizer step, over all GPUs")
    g.add_argument("--batch-tokens", type=_positive_int, default=None, metavar="TOKENS",
                   help="the batch in tokens instead: ceil(TOKENS / --max-seq-len) rows per step (overrides "
                        "--batch-size)")
    g.add_argument("--micro-batch-size", type=_positive_int, default=d.micro_batch_size, metavar="ROWS",
                   help="packed rows per forward pass on each rank (GPU); the rest of a step is gradient "
                        "accumulation")
    g.add_argument("--learning-rate", "--lr", type=_float_in(0.0, 1.0, lo_open=True), default=d.learning_rate,
                   metavar="LR", help="peak learning rate, in (0, 1): linear warm-up, then cosine decay to 0")
    g.add_argument("--weight-decay", type=_float_in(0.0, 1.0), default=d.weight_decay, metavar="WD",
                   help="AdamW weight decay on the LoRA weights, in [0, 1)")
    g.add_argument("--warmup-ratio", type=_float_in(0.0, 1.0), default=d.warmup_ratio, metavar="F",
                   help="share of the steps spent warming the learning rate up, in [0, 1)")
    g.add_argument("--max-grad-norm", type=_float_in(0.0, 1e6), default=d.max_grad_norm, metavar="NORM",
                   help="clip the gradient norm to this; 0 disables clipping")
    g.add_argument("--seed", type=_seed, default=d.seed,
                   help="seed of the LoRA init, dropout, data order and eval split")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every activation instead of recomputing each layer's in backward (faster, far more "
                        "memory; turns CUDA graphs, --offload-activations and --keep-activations off)")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep checkpointed layer inputs in host memory (long sequences on small GPUs; CUDA only)")
    g.add_argument("--keep-activations", type=_keep_gib, default=d.keep_activations, metavar="auto|off|GIB",
                   help="with CUDA graphs: GPU memory for activations kept from the forward instead of recomputed, "
                        "first the experts' gate_up outputs (46 KB per token and layer for gpt-oss-20b; ~15 %% of a "
                        "step), then whole layers; auto = what the GPU has free after the first step, less a margin; "
                        "off = recompute everything (least memory)")
    g = p.add_argument_group("base weights (frozen; how they are stored)")
    g.add_argument("--experts", choices=("auto", "dense", "mxfp4", "nf4"), default=d.experts,
                   help="expert storage; auto = mxfp4 on CUDA with the triton kernels, dense elsewhere")
    g.add_argument("--linears", choices=("auto", "dense", "nf4"), default=d.linears,
                   help="attention projections; auto = nf4 (bitsandbytes) on CUDA with the triton kernels, dense "
                        "elsewhere")
    g.add_argument("--embedding", choices=("auto", "device", "host"), default=d.embedding,
                   help="input embedding placement; auto = host memory on CUDA with the triton kernels (a step "
                        "copies only its own rows), the device elsewhere")
    g.add_argument("--lm-head", choices=("auto", "bf16", "int8", "int8-host"), default=d.lm_head,
                   help="lm_head storage: int8 (one fp32 scale per vocabulary row), int8-host (the same, its codes in "
                        "pinned host memory, streamed by the loss while it computes: 0.54 GiB less on the GPU for "
                        "gpt-oss-20b; CUDA) or bf16 (dense, in --dtype); auto = int8-host on CUDA with the triton "
                        "kernels unless tied to the embedding, bf16 elsewhere")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=_positive_int, default=d.lora_r, metavar="R", help="LoRA rank")
    g.add_argument("--lora-alpha", type=_float_in(0.0, 1e6, lo_open=True), default=d.lora_alpha, metavar="ALPHA",
                   help="LoRA scaling: the update is multiplied by ALPHA / R")
    g.add_argument("--lora-dropout", type=_float_in(0.0, 1.0), default=d.lora_dropout, metavar="P",
                   help="dropout on the LoRA input, in [0, 1) (attention targets only)")
    g.add_argument("--lora-targets", default=d.lora_targets, metavar="TARGETS",
                   help="qv | attn (q,k,v,o) | all (attention + experts) | comma list of module names")
    g = p.add_argument_group("engine")
    g.add_argument("--kernels", choices=("auto", "torch", "triton"), default=d.kernels,
                   help="auto = triton on CUDA, the torch reference elsewhere")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default=d.cuda_graphs,
                   help="replay the decoder layers of a step from CUDA graphs (the host then issues 48 launches, not "
                        "~1,200); auto = on with the triton kernels on one GPU with gradient checkpointing")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d.dtype,
                   help="base weights and activations; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=d.zero_stage,
                   help="DeepSpeed ZeRO stage (default: 2 with several ranks; one process trains without DeepSpeed's "
                        "engine unless this or --deepspeed is given)")
    g.add_argument("--deepspeed", default=None, metavar="CFG.json",
                   help="DeepSpeed config; its top-level keys replace the generated config's (batch sizes always "
                        "follow fastft's options)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    g = p.add_argument_group("outputs")
    g.add_argument("--save-every", type=_positive_int, default=d.save_every, metavar="N",
                   help="checkpoint every N steps (and at the end, and when stopped by Ctrl-C or SIGTERM)")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=d.keep_checkpoints, metavar="N",
                   help="how many of the newest checkpoint-<step> folders to keep")
    g.add_argument("--eval-every", type=_nonneg_int, default=d.eval_every, metavar="N",
                   help="eval loss every N steps; 0 = at the end of each epoch (needs --eval-fraction)")
    g.add_argument("--log-every", type=_positive_int, default=d.log_every, metavar="N",
                   help="log metrics (metrics.jsonl, TensorBoard, progress bar) every N steps")
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
            settings = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CliError(f"--deepspeed {cfg.deepspeed}: not valid JSON ({e})")
        if not isinstance(settings, dict):
            from fastft.data.reading import json_kind

            raise CliError(f"--deepspeed {cfg.deepspeed}: expected a JSON object of DeepSpeed settings "
                           f"({{\"zero_optimization\": ...}}), got {json_kind(settings)}")
    from fastft.model.lora import resolve_targets

    try:
        resolve_targets(cfg.lora_targets)
    except ValueError as e:
        raise CliError(f"--lora-targets {cfg.lora_targets!r}: {e}")
    return cfg
