"""fastft's GPT-OSS: the model in plain torch, checkpoint loading, LoRA and PEFT-format adapters.

API for the trainer::

    backend = fastft.backends.get_backend(kernels, device)          # --kernels auto|torch|triton
    path = resolve_model_path(name)                                  # dir, "tiny", or a cached hub id
    model = load_model(path, dtype, device, backend)                 # errors: ModelLoadError subclasses
    model = load_model(path, ..., experts="mxfp4", linears="nf4", lm_head="int8", offload_embedding=True)
                                                                     # the CUDA layout (see fastft.quant)
    model.quantize_lm_head("int8")                                   # the same for a model already built
    tokenizer = load_tokenizer(path)
    model = GptOssForTraining.from_config(cfg, dtype, device, backend)   # random init (e.g. ModelConfig() = 20B)
    apply_lora(model, LoraSettings(targets="qv", r=16, alpha=32, dropout=0.1))  # freezes the base weights
    params = [p for _, p in trainable_parameters(model)]             # for the optimizer
    trainable, total = count_parameters(model)
    model.enable_gradient_checkpointing(True)                        # torch.utils.checkpoint per decoder layer
    loss = model(input_ids, position_ids, cu_seqlens, labels)        # fp32 mean token loss
    logits = model.logits(input_ids, position_ids, cu_seqlens)      # [T, V] (tests, evaluation)
    save_adapter(model, out_dir, base_model_reference(name))         # PEFT 0.21 layout; a local base: absolute path
    load_adapter(model, adapter_dir)                                 # resume: apply_lora first, then load

Inputs are one packed, flattened stream: ``input_ids [T]`` and ``position_ids [T]`` (restarting at 0 per document)
int64, ``cu_seqlens [n+1]`` int32, ``labels [T]`` int64 unshifted as in HF (-100 = ignore); the model shifts them
(target of i is labels[i+1]) and ignores the last position of every document.

dtype: base weights in ``dtype`` (fp32 on CPU, bf16 on GPU); RMSNorm weights stay fp32 (as HF keeps them); LoRA
weights are created in ``LoraSettings.dtype`` (fp32) and cast to the activations' dtype inside the ops.
Adapters with expert targets are saved with ``lora_dropout: 0`` because PEFT refuses to load target_parameters with
dropout; fastft applies ``LoraSettings.dropout`` to the attention adapters only.
"""

from fastft.model.adapter import load_adapter, save_adapter
from fastft.model.config import ModelConfig
from fastft.model.gpt_oss import GptOssForTraining
from fastft.model.loading import (CheckpointError, ModelLoadError, ModelNotFoundError, base_model_reference,
                                  load_model, load_tokenizer, resolve_model_path)
from fastft.model.lora import LoraSettings, apply_lora, count_parameters, trainable_parameters

__all__ = ["CheckpointError", "GptOssForTraining", "LoraSettings", "ModelConfig", "ModelLoadError",
           "ModelNotFoundError", "apply_lora", "base_model_reference", "count_parameters", "load_adapter", "load_model",
           "load_tokenizer", "resolve_model_path", "save_adapter", "trainable_parameters"]
