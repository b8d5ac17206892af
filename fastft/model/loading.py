"""Loading GPT-OSS checkpoints: a local directory or a cached hub id, streamed tensor by tensor from safetensors.

Expert weights come either dense (``...experts.gate_up_proj``, as ``save_pretrained`` writes them) or in the hub's
MXFP4 layout (``...experts.gate_up_proj_blocks`` / ``_scales`` uint8, see fastft.mxfp4). Where they end up is the
caller's choice (``experts=``): dense in the model's dtype (hub MXFP4 dequantised on the device one expert at a time),
MXFP4 (the hub's bytes kept bit-exact, or a dense checkpoint quantised by fastft.quant as each stack streams in) or
NF4. The attention projections can be NF4 (``linears="nf4"``, bitsandbytes' quantiser), the lm_head int8 rows
(``lm_head="int8"``, fastft.quant.Int8RowsTensor). Weights that end up quantised never get a dense placeholder: they
are swapped out on the meta model before anything is allocated, and each dense checkpoint tensor is quantised on the
target device as soon as it is read, then dropped (the lm_head row chunk by row chunk, so the GPU never holds it in
bf16).

Host memory: one checkpoint tensor at a time (safetensors copies it out of the mmap; the largest, an expert stack of
gpt-oss-20b in bf16, is 1.06 GB); the two halves of an MXFP4 pair in different shards wait on the device.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from fastft.assets import BUILTIN_MODELS
from fastft.backends import Backend
from fastft.model.config import ModelConfig
from fastft.model.gpt_oss import Experts, GptOssForTraining, LmHead, LoraLinear
from fastft.mxfp4 import BLOCK, MXFP4Tensor, dequantize_expert_param
from fastft.quant import Int8RowsTensor, quantize_mxfp4, quantize_nf4, scheme_for

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(Exception):
    """A model that cannot be loaded, for a reason the user can act on (the message says which)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such local directory, and not a cached hub id."""


class CheckpointError(ModelLoadError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model directory, the built-in ``tiny`` model, or a hub id already in the local HF cache."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        if not (builtin / "config.json").is_file():
            raise ModelNotFoundError(f"the built-in {name} model is missing ({builtin}); reinstall fastft")
        return builtin
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {name}: a file; pass the model directory (config.json + *.safetensors)")
    if _HUB_ID.match(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, local_files_only=True))
        except Exception as e:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
            raise ModelNotFoundError(
                f"{name!r} is not a local directory and not in the Hugging Face cache, and fastft never downloads "
                f"(this machine may have no network). Download it where there is network, e.g. "
                f"`hf download {name} --local-dir DIR`, then pass --model DIR; or use --model tiny. "
                f"({type(e).__name__})") from None
    raise ModelNotFoundError(f"--model {name}: no such directory (expected config.json + *.safetensors), and not a "
                            f"hub id of the form owner/name")


def base_model_reference(name_or_path: str | Path) -> str:
    """What an adapter records as its base model (adapter_config.json's base_model_name_or_path): a local folder as an
    absolute path, so that PEFT finds it from any working directory; a built-in model as its folder (stock
    transformers knows no "tiny"); a hub id as given."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name].resolve())
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    return str(path.resolve())


def _config_path(model_dir: Path) -> Path:
    """model_dir/config.json, which every model folder has: without it, say so before anything else (the tokenizer,
    read first, would fail with a message about itself)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: --model expects a Hugging Face model folder "
                              f"(config.json, the tokenizer's files, *.safetensors)")
    return config_path


def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single-file checkpoint."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            with open(index) as f:
                return dict(json.load(f)["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    single = model_dir / SINGLE
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single}: unreadable safetensors file ({e}); is it truncated?") from None
    hint = " (pickled .bin checkpoints are not supported)" if any(model_dir.glob("*.bin")) else ""
    raise CheckpointError(f"{model_dir}: no {INDEX} or {SINGLE}{hint}")


class _Pending:
    """Stands in for a weight that will be held quantised (NF4, int8 rows) until its checkpoint tensor streams in.
    It owns no memory, so ``to_empty`` never allocates the dense weight it replaces."""

    device = torch.device("meta")

    def __init__(self, shape):
        self.shape = tuple(shape)


class _Fill(NamedTuple):
    """Checkpoint tensors (names, expected shapes and dtypes) and what to do with them once all are read."""
    srcs: tuple
    shapes: tuple
    dtypes: tuple
    put: Callable


def _hub_shapes(fan_in: int, fan_out: int, E: int) -> tuple:  # *_blocks, *_scales of an [E, in, out] weight
    return (E, fan_out, fan_in // BLOCK, BLOCK // 2), (E, fan_out, fan_in // BLOCK)


def _place_4bit(model: GptOssForTraining, wmap: dict, experts: str, linears: str, require_hub: bool):
    """Swaps the meta placeholders of the weights that end up 4-bit for 4-bit ones, before ``to_empty``: MXFP4 experts
    become meta uint8 buffers (filled bit-exact from a hub checkpoint, or quantised as their dense tensor streams in);
    NF4 weights become ``_Pending`` until their tensor arrives. Nothing dense is ever allocated for them."""
    if require_hub and not any(k.endswith(tuple(f"{w}_blocks" for w in Experts.WEIGHTS)) for k in wmap):
        raise CheckpointError("keep_mxfp4=True needs a checkpoint with MXFP4 experts (*_blocks / *_scales)")
    for mname, module in model.named_modules():
        if isinstance(module, LoraLinear):
            if scheme_for(f"{mname}.weight", experts, linears) == "nf4":
                module.set_quantized(_Pending((module.out_features, module.in_features)))
            continue
        if not isinstance(module, Experts):
            continue
        for w in Experts.WEIGHTS:
            scheme = scheme_for(f"{mname}.{w}", experts, linears)
            E, fan_in, fan_out = module.weight_shape(w)
            if scheme == "mxfp4":
                if fan_in % BLOCK:
                    raise ModelLoadError(f"experts='mxfp4' needs expert in-features divisible by {BLOCK}; {mname}.{w} "
                                         f"has {fan_in}")
                bshape, sshape = _hub_shapes(fan_in, fan_out, E)
                module.set_quantized(w, MXFP4Tensor(torch.empty(bshape, dtype=torch.uint8, device="meta"),
                                                    torch.empty(sshape, dtype=torch.uint8, device="meta")))
            elif scheme == "nf4":
                try:
                    module.set_quantized(w, _Pending((E, fan_in, fan_out)))
                except (AttributeError, TypeError):
                    raise ModelLoadError("experts='nf4' needs Experts.set_quantized to hold non-MXFP4 holders "
                                         "(fastft/model/gpt_oss.py)") from None


def _place_lm_head(model: GptOssForTraining, lm_head: str):
    """An int8 lm_head waits as ``_Pending`` (never allocated dense); tied embeddings cannot be split that way."""
    if lm_head != "int8":
        return
    if model.config.tie_word_embeddings:
        raise ModelLoadError("lm_head='int8' needs an lm_head of its own; this checkpoint ties it to the input "
                             "embedding (tie_word_embeddings): load it with lm_head='bf16'")
    model.lm_head.set_quantized(_Pending((model.config.vocab_size, model.config.hidden_size)))


def _base_device_dtype(model: GptOssForTraining):
    """Where and how the dense base weights live: the input embedding's (dense and on the device while loading)."""
    emb = model.model.embed_tokens.weight
    return emb.device, emb.dtype


@torch.no_grad()
def _dequantize_into(dst: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor):
    for e in range(dst.shape[0]):  # one expert at a time bounds the fp32 scratch
        b, s = blocks[e:e + 1].to(dst.device), scales[e:e + 1].to(dst.device)
        dst[e].copy_(dequantize_expert_param(b, s, torch.float32)[0])


def _plan(model: GptOssForTraining, wmap: dict) -> dict[str, _Fill]:
    """Model tensor name -> how to fill it from the checkpoint, for a model already on its device."""
    device, dtype = _base_device_dtype(model)
    state = model.state_dict()
    plan = {}

    def copy(name, dst):  # 4-bit buffers take their bytes as they are: insist on uint8
        plan[name] = _Fill((name,), (tuple(dst.shape),), (torch.uint8 if dst.dtype == torch.uint8 else None,),
                           dst.copy_)

    def hub_pair(key, shape):  # *_blocks, *_scales of the weight `key` [E, in, out]
        E, fan_in, fan_out = shape
        return (f"{key}_blocks", f"{key}_scales"), _hub_shapes(fan_in, fan_out, E), (torch.uint8, torch.uint8)

    for name, dst in state.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings and name not in wmap:
            continue
        mname, _, leaf = name.rpartition(".")
        stem = leaf.removesuffix("_blocks").removesuffix("_scales")
        if leaf in Experts.WEIGHTS and name not in wmap and f"{name}_blocks" in wmap:  # hub MXFP4 -> dense
            plan[name] = _Fill(*hub_pair(name, tuple(dst.shape)), partial(_dequantize_into, dst))
        elif stem != leaf and stem in Experts.WEIGHTS and name not in wmap and f"{mname}.{stem}" in wmap:
            if leaf.endswith("_blocks"):  # dense checkpoint -> MXFP4 buffers, quantised on the device
                key = f"{mname}.{stem}"
                blocks, scales = dst, state[f"{key}_scales"]
                shape = (blocks.shape[0], blocks.shape[2] * BLOCK, blocks.shape[1])
                plan[key] = _Fill((key,), (shape,), ("float",),
                                  partial(_put_mxfp4, blocks, scales, device=device, dtype=dtype))
        else:
            copy(name, dst)
    for mname, module in model.named_modules():  # NF4 / int8 weights waiting for their tensor
        if isinstance(module, LmHead) and isinstance(module.weight, _Pending):
            key = f"{mname}.weight"
            plan[key] = _Fill((key,), (module.weight.shape,), ("float",),
                              partial(_put_int8_rows, model.quantize_lm_head, device=device, dtype=dtype))
        elif isinstance(module, LoraLinear) and isinstance(module.weight, _Pending):
            key = f"{mname}.weight"
            plan[key] = _Fill((key,), (module.weight.shape,), ("float",),
                              partial(_put_nf4, module.set_quantized, device=device, dtype=dtype))
        elif isinstance(module, Experts):
            for w in Experts.WEIGHTS:
                pending = module.weight(w)
                if not isinstance(pending, _Pending):
                    continue
                key, hold = f"{mname}.{w}", partial(module.set_quantized, w)
                if key not in wmap and f"{key}_blocks" in wmap:  # hub MXFP4 -> NF4 through a dense scratch
                    plan[key] = _Fill(*hub_pair(key, pending.shape),
                                      partial(_put_nf4_from_mxfp4, hold, pending.shape, device=device, dtype=dtype))
                else:
                    plan[key] = _Fill((key,), (pending.shape,), ("float",),
                                      partial(_put_nf4, hold, device=device, dtype=dtype))
    return plan


# Quantising puts: the streamed tensor goes to the device in the model's dtype (so the 4-bit weight is exactly what
# loading dense and quantising afterwards gives) and is dropped as soon as its 4-bit form exists.

@torch.no_grad()
def _put_mxfp4(blocks, scales, t, *, device, dtype):
    q = quantize_mxfp4(t.to(device=device, dtype=dtype))
    blocks.copy_(q.blocks)
    scales.copy_(q.scales)


@torch.no_grad()
def _put_nf4(hold, t, *, device, dtype):
    hold(quantize_nf4(t.to(device=device, dtype=dtype)))


@torch.no_grad()
def _put_int8_rows(hold, t, *, device, dtype):  # row chunks go to the device one at a time
    hold(Int8RowsTensor.quantize(t, device=device, dtype=dtype))


@torch.no_grad()
def _put_nf4_from_mxfp4(hold, shape, blocks, scales, *, device, dtype):
    dense = torch.empty(shape, dtype=dtype, device=device)
    _dequantize_into(dense, blocks, scales)
    hold(quantize_nf4(dense))


def _read(f, shard: Path, key: str, shape: tuple, dtype=None) -> torch.Tensor:
    try:
        got = tuple(f.get_slice(key).get_shape())
        if got != tuple(shape):
            raise CheckpointError(f"{shard}: tensor {key} has shape {list(got)}, the model expects {list(shape)}")
        t = f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{shard}: cannot read tensor {key} ({e}); is the file truncated?") from None
    if dtype == "float" and not t.is_floating_point():
        raise CheckpointError(f"{shard}: tensor {key} is {t.dtype}, expected a floating-point weight")
    if isinstance(dtype, torch.dtype) and t.dtype != dtype:
        raise CheckpointError(f"{shard}: tensor {key} is {t.dtype}, expected {dtype}")
    return t


@torch.no_grad()
def load_weights(model: GptOssForTraining, model_dir: Path, wmap: dict | None = None):
    """Fills every tensor of ``model`` (already on its device, 4-bit placeholders in place) from the checkpoint, shard
    by shard and tensor by tensor: host memory holds one checkpoint tensor at a time."""
    wmap = weight_map(model_dir) if wmap is None else wmap
    origin = model_dir / (INDEX if (model_dir / INDEX).is_file() else SINGLE)
    device, _ = _base_device_dtype(model)
    plan = _plan(model, wmap)
    owner = {src: fill for fill in plan.values() for src in fill.srcs}
    missing = sorted(src for src in owner if src not in wmap)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{origin}: missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(wmap) - set(owner))
    if unexpected:
        warnings.warn(f"{origin}: ignoring {len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]}")

    by_shard = defaultdict(list)
    for src in owner:
        by_shard[wmap[src]].append(src)
    pending = {}  # halves of an MXFP4 pair waiting for their partner (possibly in a later shard)
    for shard_name in sorted(by_shard):
        shard = model_dir / shard_name
        if not shard.is_file():
            raise CheckpointError(f"{origin}: shard {shard_name} is listed but missing from {model_dir}")
        try:
            f = safe_open(shard, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e}); is it truncated?") from None
        with f:
            for src in sorted(by_shard[shard_name]):
                fill = owner[src]
                i = fill.srcs.index(src)
                t = _read(f, shard, src, fill.shapes[i], fill.dtypes[i])
                if len(fill.srcs) == 1:
                    fill.put(t)
                else:  # 4-bit halves wait on the device, so host memory never accumulates them
                    pending[src] = t.to(device)
                    if all(s in pending for s in fill.srcs):
                        fill.put(*(pending.pop(s) for s in fill.srcs))
                del t  # before the next read: never two large checkpoint tensors in host memory


_EXPERTS, _LINEARS, _LM_HEADS = ("dense", "mxfp4", "nf4"), ("dense", "nf4"), ("bf16", "dense", "int8")


def load_model(name_or_path: str | Path, dtype=torch.float32, device="cpu", backend: Backend | None = None,
               keep_mxfp4: bool = False, *, experts: str = "dense", linears: str = "dense", lm_head: str = "bf16",
               offload_embedding: bool = False) -> GptOssForTraining:
    """A GPT-OSS checkpoint as a GptOssForTraining on ``device``: base weights in ``dtype`` (norms fp32), frozen
    later by apply_lora.

    experts: "dense" (``dtype``), "mxfp4" (a hub checkpoint's own bytes, or quantised from a dense checkpoint as each
    stack streams in) or "nf4" (bitsandbytes, quantised on the device). linears: "dense" or "nf4" for the attention
    projections q/k/v/o (see fastft.quant for the policy). ``keep_mxfp4=True`` is ``experts="mxfp4"`` that insists on
    a hub MXFP4 checkpoint. lm_head: "bf16" (dense in ``dtype``; "dense" says the same) or "int8" (one fp32 scale per
    vocabulary row, quantised on the device as it streams in; frozen; see GptOssForTraining.quantize_lm_head).
    offload_embedding: freeze the input embedding and move it to (pinned) host memory.
    """
    if keep_mxfp4:
        if experts not in ("dense", "mxfp4"):
            raise ValueError(f"keep_mxfp4=True keeps MXFP4 experts; it contradicts experts={experts!r}")
        experts = "mxfp4"
    if experts not in _EXPERTS or linears not in _LINEARS:
        raise ValueError(f"experts must be one of {_EXPERTS} and linears one of {_LINEARS}; got {experts!r}, "
                         f"{linears!r}")
    if lm_head not in _LM_HEADS:
        raise ValueError(f"lm_head must be one of {_LM_HEADS}, not {lm_head!r}")
    model_dir = resolve_model_path(name_or_path)
    config_path = _config_path(model_dir)
    try:
        cfg = ModelConfig.from_json(config_path)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    wmap = weight_map(model_dir)
    with torch.device("meta"):
        model = GptOssForTraining(cfg, backend)
    model.to_dtype(dtype)
    _place_4bit(model, wmap, experts, linears, require_hub=keep_mxfp4)
    _place_lm_head(model, lm_head)
    model.to_empty(device=device)  # allocates in dtype directly, and only what stays dense
    load_weights(model, model_dir, wmap)
    if offload_embedding:
        model.model.embed_tokens.weight.requires_grad_(False)  # apply_lora would freeze it anyway
        model.offload_embedding()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the quantisers' scratch: give it back before training allocates
    model.source_dir = str(model_dir)
    return model


def load_tokenizer(name_or_path: str | Path):
    """The model directory's tokenizer (local files only, no remote code)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(name_or_path)
    _config_path(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({e})") from None
