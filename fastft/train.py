#!/usr/bin/env python
"""fastft: fine-tune GPT-OSS with LoRA from JSONL files.

    python fastft/train.py data.jsonl --model tiny
    deepspeed --num_gpus 8 fastft/train.py data.jsonl --model /path/to/gpt-oss-20b

The whole run, top to bottom: options -> data -> model + LoRA -> DeepSpeed engine -> loop -> outputs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python fastft/train.py`: import the package, not its folder's modules as top-level
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch takes a second or two to import. A KeyboardInterrupt raised inside it can be swallowed by its C code and
# leave numpy half imported, so a signal meanwhile is only noted, and main() stops on it.
_early_signals: list[int] = []


@contextlib.contextmanager
def _signals_noted():
    """SIGINT / SIGTERM are appended to _early_signals instead of acting, until the block ends."""
    before = {s: signal.signal(s, lambda signum, frame: _early_signals.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


with _signals_noted() if __name__ == "__main__" else contextlib.nullcontext():
    import torch

    from fastft import checkpoint, output_dir
    from fastft.config import CliError, TrainConfig, parse_args
    from fastft.output_dir import OutputDirError


class TrainingError(Exception):
    """A problem the user can act on (a non-finite loss, a checkpoint of another run): one message, exit 1."""


def main(argv=None) -> int:
    try:
        with _signals_noted():  # parse_args imports fastft.model (a second or more), like torch's import above
            cfg = parse_args(argv)
    except CliError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    if _early_signals:  # one that came while torch or fastft's model imported
        return _stopped_before_training(_early_signals[0], cfg)
    stop = StopRequest()  # from here to the first step a signal stops at once (the imports below take seconds)
    try:
        return _run(cfg, stop)
    except StoppedBeforeTraining as e:
        return _stopped_before_training(e.signum, cfg)
    except Exception:
        if stop.signum and not stop.training:  # a library turned the stop into an error of its own (an import)
            return _stopped_before_training(stop.signum, cfg)
        raise
    finally:
        stop.release()


def _stopped_before_training(signum: int, cfg: TrainConfig) -> int:
    print(f"fastft: stopped by {signal.Signals(signum).name} before training started; nothing was changed in "
          f"{cfg.output_dir}", file=sys.stderr)
    return 128 + signum


def _run(cfg: TrainConfig, stop: "StopRequest") -> int:
    from fastft.data import DataError, UsageError
    from fastft.engine import DeepSpeedMissing
    from fastft.model import ModelLoadError

    try:
        return validate_only(cfg) if cfg.validate_only else train(cfg, stop)
    except UsageError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # its message is the data report, which names itself ("fastft data report")
        print(e, file=sys.stderr)
        return 1
    except (ModelLoadError, TrainingError, DeepSpeedMissing, OutputDirError) as e:
        print(f"fastft: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # training: a second Ctrl-C (see StopRequest); no traceback, the shell's status
        hint = "" if cfg.validate_only else (", without saving; --resume continues from the last checkpoint in "
                                             "--output-dir, if there is one")
        print(f"fastft: interrupted by Ctrl-C{hint}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        from fastft.engine import shutdown_distributed

        shutdown_distributed()  # the process group training started, if it did
        output_dir.finish()  # a run that saved no checkpoint is undone


def data_config(cfg: TrainConfig):
    from fastft.data import DataConfig

    return DataConfig(paths=list(cfg.data), max_seq_len=cfg.max_seq_len, train_on_all=cfg.train_on_all,
                      skip_invalid=cfg.skip_invalid, overlong=cfg.overlong, drop_duplicates=cfg.drop_duplicates,
                      seed=cfg.seed, eval_fraction=cfg.eval_fraction)


def validate_only(cfg: TrainConfig) -> int:
    """The data report. Without a loadable tokenizer the structure is still checked, and the report says so."""
    from fastft.data import validate
    from fastft.model import ModelLoadError, load_tokenizer, resolve_model_path

    rows_per_step(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # what training refuses, this refuses too
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ModelLoadError as e:
        print(f"fastft: note: {e}\nfastft: checking structure only (no token statistics)", file=sys.stderr)
        tokenizer = None
    else:
        check_context_length(cfg, resolve_model_path(cfg.model))
    report = validate(data_config(cfg), tokenizer)
    print(report.format())
    return report.exit_code


def rows_per_step(cfg: TrainConfig, world_size: int) -> int:
    """Rows per optimizer step; a bad command line (exit 2) when they do not split into ranks x micro-batches.
    Checked before the data is read and before --output-dir is made."""
    from fastft.data import UsageError

    rows = cfg.batch_size
    if cfg.batch_tokens:
        rows = max(1, math.ceil(cfg.batch_tokens / cfg.max_seq_len))
    per_rank = rows / world_size
    if per_rank != int(per_rank) or int(per_rank) % cfg.micro_batch_size:
        split = world_size * cfg.micro_batch_size
        fix = (f"--batch-tokens {cfg.batch_tokens} asks for {rows} rows of --max-seq-len {cfg.max_seq_len}: choose "
               f"--batch-tokens as a multiple of {split * cfg.max_seq_len}" if cfg.batch_tokens
               else f"choose --batch-size as a multiple of {split}")
        raise UsageError(f"a step of {rows} rows does not split into {world_size} rank(s) x micro-batches of "
                         f"{cfg.micro_batch_size}; {fix}")
    return rows


def batch_plan(cfg: TrainConfig, world_size: int, rows_per_epoch: int, warn=print) -> dict:
    rows = fit_to_epoch(cfg, rows_per_step(cfg, world_size), rows_per_epoch, world_size, warn)
    per_rank = rows // world_size
    steps_per_epoch = max(1, math.ceil(rows_per_epoch / rows))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return {"rows_per_step": rows, "grad_accum": per_rank // cfg.micro_batch_size,
            "steps_per_epoch": steps_per_epoch, "total_steps": total}


def fit_to_epoch(cfg: TrainConfig, rows: int, rows_per_epoch: int, world_size: int, warn) -> int:
    """A step of more rows than an epoch has would take rows again and again within the step (--batch-size 100000
    over one packed row: 100,000 passes, or no memory for the list): it takes each row once instead, as many as
    still split into ranks x micro-batches, and ``warn`` says so."""
    if rows <= rows_per_epoch:
        return rows
    asked = f"--batch-tokens {cfg.batch_tokens}" if cfg.batch_tokens else f"--batch-size {cfg.batch_size}"
    unit = world_size * cfg.micro_batch_size
    fitted = rows_per_epoch // unit * unit
    if not fitted:
        raise TrainingError(f"{asked}: the data packs into {rows_per_epoch} row(s) of --max-seq-len "
                            f"{cfg.max_seq_len}, fewer than one step's {world_size} rank(s) x --micro-batch-size "
                            f"{cfg.micro_batch_size}; lower --micro-batch-size or --max-seq-len, or add data")
    warn(f"{asked} asks for {rows:,} packed rows per step, but the data packs into {rows_per_epoch:,} of --max-seq-len "
         f"{cfg.max_seq_len}: a step takes {fitted:,}, each row once")
    return fitted


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class StoppedBeforeTraining(BaseException):
    """Ctrl-C / SIGTERM while the run starts (data, model, engine): nothing is written yet, so it stops at once. A
    BaseException, as KeyboardInterrupt is: a library's ``except Exception`` (a model lookup's, a build's) must not
    swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGTERM / Ctrl-C: before training starts, StoppedBeforeTraining at once; once it runs, finish the current
    step, save a checkpoint, then exit with 128 + the signal's number (130, 143: the shell's convention), so that a
    script sees the run did not finish. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = 0  # the first signal received (0: none)
        self.training = False
        self._before = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def training_starts(self):
        if self.signum:  # a stop while the run started that a library swallowed (C code clearing an import's error)
            raise StoppedBeforeTraining(self.signum)
        self.training = True

    def release(self):
        for s, handler in self._before.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if not self.training:
            self.signum = signum
            raise StoppedBeforeTraining(signum)
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print(f"\nfastft: {signal.Signals(signum).name} received: saving a checkpoint after this step",
              file=sys.stderr)


def stopped_early(signum: int, step: int, total: int, ckpt: Path, cfg: TrainConfig) -> str:
    """The one line a stop by signal ends with: what stopped, where it was saved and how to go on."""
    again = "again" if cfg.resume else "with --resume added"
    return (f"fastft: stopped early by {signal.Signals(signum).name} at step {step}/{total} (checkpoint {ckpt}); "
            f"to continue, run the same command {again} (same data and options, --output-dir {cfg.output_dir})")


def weight_layout(cfg: TrainConfig, backend, device, tied: bool = False) -> dict:
    """Where and how the base weights live. auto = the fast path when the triton kernels run on CUDA (MXFP4 experts,
    NF4 attention projections, int8 lm_head with its codes in host memory, input embedding in host memory: ~9.8 GiB
    resident for gpt-oss-20b, see
    fastft.quant); elsewhere the checkpoint's own layout, which the torch reference reads directly. An lm_head tied
    to the embedding (``tied``) stays dense under auto."""
    fast = torch.device(device).type == "cuda" and backend.sources["moe"] == "triton"
    lm_head = "int8-host" if fast and not tied else "bf16"
    return {
        "experts": cfg.experts if cfg.experts != "auto" else ("mxfp4" if fast else "dense"),
        "linears": cfg.linears if cfg.linears != "auto" else ("nf4" if fast else "dense"),
        "embedding": cfg.embedding if cfg.embedding != "auto" else ("host" if fast else "device"),
        "lm_head": cfg.lm_head if cfg.lm_head != "auto" else lm_head,
    }


def check_layout_installed(layout: dict) -> None:
    """NF4 weights are made by bitsandbytes' quantiser, which only the [gpu] extra installs: say so before loading."""
    from fastft.data import UsageError

    nf4 = [f"--{k} nf4" for k in ("experts", "linears") if layout[k] == "nf4"]
    if nf4 and not _have_bitsandbytes():
        raise UsageError(f"{' and '.join(nf4)} (--linears nf4 is the default on CUDA) need bitsandbytes, which is not "
                         f"installed: pip install -e '.[gpu]', or keep those weights in bf16 with --linears dense")


def _have_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _model_config(model_path: Path):
    """The checkpoint's ModelConfig, or None if unreadable (load_model says why)."""
    from fastft.model import ModelConfig

    try:
        return ModelConfig.from_json(Path(model_path) / "config.json")
    except (OSError, ValueError, TypeError):
        return None


def ties_lm_head(model_path: Path) -> bool:
    """Whether the checkpoint ties its lm_head to the input embedding."""
    config = _model_config(model_path)
    return bool(config and config.tie_word_embeddings)


def check_context_length(cfg: TrainConfig, model_path: Path) -> None:
    """A packed row longer than the model's positions would train RoPE angles it was never made for."""
    from fastft.data import UsageError

    config = _model_config(model_path)
    if config and cfg.max_seq_len > config.max_position_embeddings:
        raise UsageError(f"--max-seq-len {cfg.max_seq_len:,} is longer than --model {cfg.model}'s context "
                         f"(max_position_embeddings {config.max_position_embeddings:,}); use at most that")


def ignored_options(cfg: TrainConfig, device, graphs: bool) -> list[str]:
    """Options given that change nothing in this run (a GPU command line run on a CPU for a demo, say): one warning
    each rather than an error, so that the same command line still runs."""
    cpu = torch.device(device).type != "cuda"
    out = []
    no_checkpointing = "--no-gradient-checkpointing turns checkpointing off"
    if cfg.cuda_graphs == "on" and not graphs:
        out.append("--cuda-graphs on: " + ("CUDA graphs need a CUDA GPU" if cpu else
                                           f"the graphs replay checkpointed layers, and {no_checkpointing}"))
    if cfg.keep_activations not in ("auto", "off") and not graphs:
        why = "there are none on a CPU" if cpu else "CUDA graphs are off (see --cuda-graphs)"
        out.append(f"--keep-activations {cfg.keep_activations:g}: only layers replayed from CUDA graphs keep "
                   f"activations, and {why}")
    if cfg.offload_activations and cpu:
        out.append("--offload-activations: on a CPU the activations are in host memory already")
    elif cfg.offload_activations and not cfg.gradient_checkpointing:
        out.append(f"--offload-activations: it moves the layer inputs that checkpointing keeps, and {no_checkpointing}")
    if cfg.embedding == "host" and cpu:
        out.append("--embedding host: on a CPU the embedding is in host memory already")
    if cfg.lm_head == "int8-host" and cpu:
        out.append("--lm-head int8-host: on a CPU the lm_head is in host memory already (held int8)")
    if cfg.eval_every and not cfg.eval_fraction:
        out.append(f"--eval-every {cfg.eval_every}: there is no eval set (--eval-fraction 0)")
    if cfg.overwrite and cfg.resume:
        out.append("--overwrite: --resume continues the run in --output-dir and replaces nothing")
    return [f"{w}; ignored" for w in out]


class RunClock:
    """Time and tokens of the whole run, segment by segment (the first start and each --resume). The segments before
    this process come from the checkpoint it resumed, each as of its last checkpoint (steps redone after a kill count
    once); this one is measured here. metadata.json reports them and their totals."""

    def __init__(self, start_step: int, earlier: list, t_start: float):
        self.start_step, self.earlier, self.t_start = start_step, list(earlier), t_start
        self.t_loop, self.tokens = None, 0

    def start_loop(self):
        self.t_loop = time.time()

    def segments(self, step: int, peak_gib: float | None) -> list[dict]:
        """The earlier segments and this one up to now, at ``step``."""
        now = time.time()
        mine = {"start_step": self.start_step, "end_step": step, "wall_seconds": now - self.t_start,
                "train_loop_seconds": now - self.t_loop if self.t_loop else 0.0, "tokens": self.tokens,
                "peak_gpu_memory_gib": peak_gib}
        return self.earlier + [mine]


def run_totals(segments: list[dict]) -> dict:
    """metadata.json's totals over all segments (tokens/s: tokens over time in the training loops)."""
    loop, tokens = sum(s["train_loop_seconds"] for s in segments), sum(s["tokens"] for s in segments)
    peaks = [s["peak_gpu_memory_gib"] for s in segments if s.get("peak_gpu_memory_gib") is not None]
    return {"wall_seconds": sum(s["wall_seconds"] for s in segments), "train_loop_seconds": loop,
            "tokens_processed": tokens, "tokens_per_s": tokens / loop if loop > 0 else None,
            "peak_gpu_memory_gib": max(peaks) if peaks else None}


def use_cuda_graphs(cfg, backend, dist) -> bool:
    """--cuda-graphs: auto = on for the Triton kernels on one GPU with checkpointing (multi-GPU ZeRO runs keep the
    eager layers: their gradient hooks are untested under graph replay); on = wherever checkpointing is on."""
    if cfg.cuda_graphs == "off" or not cfg.gradient_checkpointing or dist.device.type != "cuda":
        return False
    return cfg.cuda_graphs == "on" or (backend.name == "triton" and dist.world_size == 1)


def check_resumable(ckpt: Path, run: dict) -> None:
    """--resume continues the same run: the same data files, row length, batch and LoRA shape as the checkpoint's
    (its trainer_state.json records them). Anything else would fail deep in loading, or silently train another run."""
    import json

    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("run")
    if saved is None:  # a checkpoint from before these were recorded
        return
    names = {"data_sha256": "data files (sha256)", "max_seq_len": "--max-seq-len", "rows_per_step": "rows per step",
             "lora": "LoRA (r, alpha, targets)"}
    diff = [f"{names[k]}: checkpoint {saved[k]}, now {run[k]}" for k in run if k in saved and saved[k] != run[k]]
    if diff:
        raise TrainingError(f"--resume: {ckpt} belongs to a different run ({'; '.join(diff)}). Resume with the "
                            f"options and data it was trained with, or start afresh in another --output-dir "
                            f"(or with --overwrite instead of --resume)")


def graph_tokens(cfg: TrainConfig) -> int:
    """The token count every micro-batch is padded to with CUDA graphs: its most (a multiple of 256). Packed rows
    vary in length, and each padded size needs its own graphs and buffers (up to two are captured, other sizes run
    eagerly at the host's pace): one size serves every step, for the cost of the few padding tokens of a packed row."""
    return -(-cfg.max_seq_len * cfg.micro_batch_size // 256) * 256


# A full disk, a quota, a read-only or forbidden path: the machine's state, not fastft's bug, in any phase
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def train(cfg: TrainConfig, stop: "StopRequest") -> int:
    from safetensors import SafetensorError

    try:
        return _train(cfg, stop)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        if stop.training:
            raise TrainingError(write_failed(e, Path(cfg.output_dir))) from None
        if getattr(e, "errno", None) in _ENVIRONMENT_ERRNOS:  # e.g. the tokenisation cache on a full disk
            raise TrainingError(f"{e.filename or 'a file operation'}: {e.strerror}") from None
        raise  # (another OSError before training is a bug to see)


def write_failed(e: Exception, out: Path) -> str:
    """Once training runs, an OSError (or safetensors' error for the same) is a write into --output-dir that failed
    (a full disk, a quota, a folder removed under the run): what failed, and what the last saved state is."""
    filename = getattr(e, "filename", None)
    what = f"cannot write {filename}" if filename else "a write failed"
    saved = checkpoint.latest_checkpoint(out)
    then = (f"the last complete checkpoint is {saved}: once that is fixed, run the same command with --resume "
            f"added" if saved else "no checkpoint of this run was saved")
    return f"{what} ({getattr(e, 'strerror', None) or e}); {then}"


def _train(cfg: TrainConfig, stop: StopRequest) -> int:
    import torch.distributed as dist_

    from fastft import observers as obs
    from fastft.backends import get_backend
    from fastft.data import UsageError, collate, prepare
    from fastft.kernels._env import interpreting
    from fastft.engine import (LocalEngine, adamw, deepspeed_config, import_deepspeed, init_distributed,
                               resolve_dtype, uses_deepspeed)
    from fastft.metadata import git_revision, versions
    from fastft.model import (LoraSettings, apply_lora, base_model_reference, load_model, load_tokenizer,
                              resolve_model_path, save_adapter)

    t_start = time.time()
    dist = init_distributed(cfg.local_rank, cfg)
    rows_per_step(cfg, dist.world_size)
    # DeepSpeed's engine serves several ranks and --zero-stage / --deepspeed; one process needs none of it
    deepspeed = import_deepspeed("--zero-stage / --deepspeed") if uses_deepspeed(cfg, dist.world_size) else None
    outputs, resume_from = output_dir.prepare(cfg) if dist.is_main else (None, None)
    out = Path(cfg.output_dir)
    if dist.world_size > 1:  # every rank resumes from what rank 0 found
        box = [str(resume_from) if resume_from else None]
        dist_.broadcast_object_list(box, src=0)
        resume_from = Path(box[0]) if box[0] else None
    dtype = resolve_dtype(cfg.dtype, dist.device)
    if cfg.kernels == "triton" and dist.device.type != "cuda" and not interpreting():
        raise UsageError("--kernels triton needs a CUDA GPU (on CPU, TRITON_INTERPRET=1 runs the kernels in Triton's "
                         "interpreter, slowly); use --kernels auto or torch")
    backend = get_backend(cfg.kernels, dist.device)
    say = print if dist.is_main else (lambda *a, **k: None)

    def warn(message):
        say(f"fastft: warning: {message}", file=sys.stderr)

    graphs = use_cuda_graphs(cfg, backend, dist)
    for warning in ignored_options(cfg, dist.device, graphs):
        warn(warning)

    # ---- data: validated, tokenised (cached), packed ------------------------------------------------------------
    model_path = resolve_model_path(cfg.model)
    check_context_length(cfg, model_path)
    tokenizer = load_tokenizer(model_path)
    data = prepare(data_config(cfg), tokenizer)
    say(data.report.format())
    plan = batch_plan(cfg, dist.world_size, len(data.packed_rows("train", epoch=0)), warn)

    # ---- model + LoRA -------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    layout = weight_layout(cfg, backend, dist.device, tied=ties_lm_head(model_path))
    check_layout_installed(layout)
    head = "int8" if layout["lm_head"] == "int8-host" else layout["lm_head"]  # loaded int8, then its codes move
    model = load_model(model_path, dtype=dtype, device=dist.device, backend=backend, experts=layout["experts"],
                       linears=layout["linears"], lm_head=head)
    if layout["lm_head"] == "int8-host" and torch.device(dist.device).type == "cuda":
        model.lm_head_codes_to_host()
    apply_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   targets=cfg.lora_targets))
    if layout["embedding"] == "host":
        model.offload_embedding()  # after apply_lora: only a frozen embedding can move
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing,
                                        offload=cfg.offload_activations and cfg.gradient_checkpointing)
    keep = {"off": 0}.get(cfg.keep_activations, cfg.keep_activations)
    model.use_layer_graphs(graphs, keep_gib=keep, pad_to=graph_tokens(cfg))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in named.values())
    say(f"fastft: model {cfg.model} ({dtype}, kernels: {backend.name} {backend.sources}), "
        f"LoRA {cfg.lora_targets} r={cfg.lora_r}: {n_trainable:,} trainable parameters; weights {layout}; "
        f"CUDA graphs {'on' if graphs else 'off'}")
    torch.manual_seed(cfg.seed + 1000 * (dist.rank + 1))  # per-rank dropout masks

    # ---- engine: DeepSpeed's for several ranks, fastft's own for one process (see fastft/engine.py) -------------
    warmup = int(cfg.warmup_ratio * plan["total_steps"])
    deepspeed_engine = uses_deepspeed(cfg, dist.world_size)
    optimizer = adamw(list(named.values()), cfg, fused=dist.device.type == "cuda" and not deepspeed_engine)
    schedule = cosine_with_warmup(plan["total_steps"], max(warmup, 1) if warmup else 0)
    ds_config = None
    if deepspeed_engine:
        ds_config = deepspeed_config(cfg, cfg.micro_batch_size, plan["grad_accum"], dist.world_size, dtype,
                                     warn=warn)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, model_parameters=list(named.values()),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        engine = LocalEngine(model, named.values(), optimizer, scheduler, plan["grad_accum"], cfg.max_grad_norm)

    step, history, earlier_segments = 0, {"train_loss": [], "eval_loss": []}, []
    run = {"data_sha256": sorted(data.data_hashes.values()), "max_seq_len": cfg.max_seq_len,
           "rows_per_step": plan["rows_per_step"], "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                                           "targets": cfg.lora_targets}}
    if resume_from is not None:
        from safetensors import SafetensorError

        try:
            check_resumable(resume_from, run)
            state = checkpoint.load(resume_from, engine, named, dist.rank)
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated or hand-edited checkpoint
            raise TrainingError(f"--resume: {resume_from} is not a readable checkpoint ({type(e).__name__}: {e}); "
                                f"point {out / checkpoint.LATEST} at an earlier checkpoint-<step> folder, or start "
                                f"afresh with --overwrite") from None
        step, history, earlier_segments = state["step"], state["history"], state.get("segments", [])
        engine.global_steps = state["optimizer_steps"]  # Adam's step count goes on from there
        scheduler.last_epoch = step - 1
        # torch warns of a schedule step before any optimizer step; a resume takes one by design, and skips no lr
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()  # sets the lr of step `step` on the optimizer
        say(f"fastft: resumed from {resume_from} at step {step}")
    clock = RunClock(step, earlier_segments, t_start)
    base_model = base_model_reference(cfg.model)  # adapter_config.json's: PEFT must find it from anywhere

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else None

    def save_ckpt():
        trainer_state = {"step": step, "optimizer_steps": engine.global_steps + 0, "history": history,
                         "plan": plan, "seed": cfg.seed, "run": run, "segments": clock.segments(step, peak_gib())}
        saved = checkpoint.save(out, step, engine, named, trainer_state,
                                lambda d: save_adapter(model, d, base_model_name_or_path=base_model),
                                dist.rank, cfg.keep_checkpoints)
        if outputs:
            outputs.saved()  # resumable from here: a stop keeps this run's files (and the older run's, aside)
        return saved

    stop.training_starts()  # from here a signal saves a checkpoint after the step (StopRequest)
    if outputs:
        outputs.begin()  # the first write: --overwrite sets the older run aside
    observers: list[obs.Observer] = []
    if dist.is_main:
        observers = [obs.MetricsLog(out / "metrics.jsonl", resume_step=step), obs.TensorBoard(out / "runs"),
                     obs.LossPlot(out / "metrics.jsonl", out / "loss.png")]
        if cfg.progress:
            observers.insert(0, obs.ProgressBar())
    for o in observers:
        o.start({"total_steps": plan["total_steps"], "start_step": step})

    def to_device(batch):
        return {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}

    def global_sum(*values):  # device tensors among the values are read here: one host sync
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dist.device) for v in values])
        if dist.world_size > 1:
            dist_.all_reduce(t)
        return t.tolist()

    def evaluate() -> float | None:
        rows = data.packed_rows("eval", epoch=0)[dist.rank::dist.world_size]
        if data.num_eval_rows == 0:
            return None
        engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), cfg.micro_batch_size):
                batch = to_device(collate(rows[i:i + cfg.micro_batch_size]))
                n = int((batch["labels"][1:] != -100).sum())
                total += float(engine(**batch)) * n
                count += n
        engine.train()
        total, count = global_sum(total, count)
        return total / max(count, 1)

    # ---- the loop -----------------------------------------------------------------------------------------------
    engine.train()
    epoch_rows, epoch_of_rows = None, -1
    clock.start_loop()
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    while step < plan["total_steps"]:
        epoch, index = divmod(step, plan["steps_per_epoch"])
        if epoch != epoch_of_rows:
            epoch_rows, epoch_of_rows = data.packed_rows("train", epoch=epoch), epoch
        B = plan["rows_per_step"]
        step_rows = [epoch_rows[(index * B + i) % len(epoch_rows)] for i in range(B)]  # wraps to fill the last step
        mine = step_rows[dist.rank::dist.world_size]
        t0 = time.time()
        lr = scheduler.get_last_lr()[0]  # this step's (the engine's step moves the schedule on)
        losses, n_tokens = [], 0
        for i in range(0, len(mine), cfg.micro_batch_size):
            batch = to_device(collate(mine[i:i + cfg.micro_batch_size]))
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())  # read once per step, below: a read here would idle the GPU until backward
            n_tokens += batch["input_ids"].numel()
        step += 1
        n_micro = len(mine) / cfg.micro_batch_size
        loss_sum, n_tokens, n_micro = global_sum(torch.stack(losses).sum(), n_tokens, n_micro)
        if not math.isfinite(loss_sum):  # nothing is saved after this: the last checkpoint is the last good state
            last = checkpoint.latest_checkpoint(out)
            raise TrainingError(f"the loss became {loss_sum / n_micro} at step {step}; stopping. The last good "
                                f"checkpoint is {last or 'none (no checkpoint was saved yet)'}; try a lower "
                                f"--learning-rate, then --resume")
        dt = time.time() - t0
        clock.tokens += int(n_tokens)
        metrics = {"step": step, "epoch": epoch + (index + 1) / plan["steps_per_epoch"],
                   "loss": loss_sum / n_micro, "lr": lr,
                   "grad_norm": _maybe_float(engine.get_global_grad_norm()),
                   "tokens": int(n_tokens), "tokens_per_s": n_tokens / dt, "step_s": dt,
                   "gpu_mem_gib": peak_gib()}
        history["train_loss"].append(metrics["loss"])
        if step % cfg.log_every == 0 or step == plan["total_steps"]:
            for o in observers:
                o.step(metrics)
        end_of_epoch = step % plan["steps_per_epoch"] == 0
        if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) \
                or step == plan["total_steps"]:
            eval_loss = evaluate()
            if eval_loss is not None:
                history["eval_loss"].append((step, eval_loss))
                for o in observers:
                    o.eval({"step": step, "eval_loss": eval_loss})
        # A signal during the last step stops nothing: the run ends as it would have, outputs and all.
        stop_signal = _max_over_ranks(stop.signum, dist) if step < plan["total_steps"] else 0
        if step % cfg.save_every == 0 or step == plan["total_steps"] or stop_signal:
            ckpt = save_ckpt()
        if stop_signal:
            for o in observers:
                o.end({})
            say(stopped_early(stop_signal, step, plan["total_steps"], ckpt, cfg), file=sys.stderr)
            return 128 + stop_signal

    # ---- outputs ------------------------------------------------------------------------------------------------
    segments = clock.segments(step, peak_gib())
    totals = run_totals(segments)
    if dist.is_main:
        save_adapter(model, out, base_model_name_or_path=base_model)
        written = [Path(f).name for f in tokenizer.save_pretrained(out)]
        import json

        (out / "training_config.json").write_text(json.dumps(cfg.to_json(), indent=1))
        meta = {
            "versions": versions(), "git_revision": git_revision(),
            "model": cfg.model, "model_path": str(model_path), "dtype": str(dtype).replace("torch.", ""),
            "kernels": {"backend": backend.name, **backend.sources}, "weights": layout,
            # {tokens: [layers keeping h, whole layers, layers spilling h to the host, the share spilled]}
            "cuda_graphs": graphs, "kept_activation_layers": model.kept_layers(),
            "world_size": dist.world_size, "engine": "deepspeed" if ds_config else "fastft (one process)",
            "zero_stage": ds_config["zero_optimization"].get("stage", 0) if ds_config else None,
            "data": {"files": data.data_hashes, "rows": data.num_rows, "eval_rows": data.num_eval_rows,
                     "tokens": data.num_tokens, "trainable_tokens": data.num_trainable_tokens,
                     "packed_rows": data.num_packed_rows, "packing_efficiency": data.packing_efficiency,
                     "max_seq_len": cfg.max_seq_len},
            "steps": step, "plan": plan, "trainable_parameters": n_trainable,
            **totals, "segments": segments,  # the whole run: totals over the first start and every --resume
            "final_train_loss": history["train_loss"][-1] if history["train_loss"] else None,
            "final_eval_loss": history["eval_loss"][-1][1] if history["eval_loss"] else None,
            # fastft's mark: --overwrite replaces only outputs it can tell are its own (fastft.output_dir)
            "written_by": "fastft", "outputs": sorted({*output_dir.FINAL_OUTPUTS, *output_dir.LOGS, *written}),
        }
        (out / "metadata.json").write_text(json.dumps(meta, indent=1))
        outputs.completed()  # --overwrite: only now does the older run go
    for o in observers:
        o.end({})
    say(f"fastft: done in {totals['wall_seconds']:.0f}s; final train loss {history['train_loss'][-1]:.4f}. "
        f"Adapter written to {out}/ (load it with peft.PeftModel.from_pretrained(base_model, '{out}'))")
    return 0


def _maybe_float(x):
    try:
        return float(x) if x is not None else None
    except (TypeError, ValueError):
        return None


def _max_over_ranks(value: int, dist) -> int:
    """The largest of every rank's ``value`` (a signal reaches some ranks and not others: all stop together)."""
    if dist.world_size == 1:
        return value
    import torch.distributed as dist_

    t = torch.tensor([value], device=dist.device)
    dist_.all_reduce(t, op=dist_.ReduceOp.MAX)
    return int(t.item())


if __name__ == "__main__":
    sys.exit(main())
