"""GPT-OSS for training on packed token streams, in plain torch.

Parameter names equal transformers' ``GptOssForCausalLM`` state dict, so checkpoints load by name. The ops that
kernels replace (attention, moe, lora_linear, loss, rms_norm, rope) are called through a ``fastft.backends.Backend``;
everything else here is ordinary torch. Activations are flat: ``[T, H]`` for the T tokens of a packed batch;
``cu_seqlens`` bounds the documents and ``position_ids`` restart at 0 in each.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastft.backends import Backend, get_backend, recompute_skips_output
from fastft.model.config import ModelConfig, rope_frequencies
from fastft.model.layer_graphs import PAD_TO, LayerGraphs
from fastft.model.offload import HostOffload
from fastft.mxfp4 import MXFP4Tensor

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Weights stay fp32 (HF keeps GPT-OSS norms in fp32 too); the input is normalised in fp32 by ``backend.rms_norm``
    (torch: fastft.kernels.rms_norm's lean-memory reference)."""

    def __init__(self, hidden_size: int, eps: float, backend: Backend | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.eps = eps
        self.backend = backend if backend is not None else get_backend("torch")

    def forward(self, x):
        return self.backend.rms_norm(x, self.weight, self.eps)


class _HoldsQuantized:
    """A linear module whose frozen ``weight`` [out_features, in_features] may be a quantized holder instead of a
    Parameter (``set_quantized``): it leaves the parameters, so it is never trained, saved or moved by ``.to()``."""

    _what = "weight"  # for messages

    def set_quantized(self, q):
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized {self._what} {tuple(q.shape)} != ({self.out_features}, {self.in_features})")
        self._parameters.pop("weight", None)
        self.weight = q

    @property
    def quantized(self) -> bool:
        return not isinstance(self.weight, torch.Tensor)


class LoraLinear(_HoldsQuantized, nn.Module):
    """nn.Linear's parameters (``weight [out, in]``, ``bias``) plus an optional unmerged LoRA (``lora_A [r, in]``,
    ``lora_B [out, r]``), computed by ``backend.lora_linear``. The base weight may be held 4-bit (``set_quantized``:
    an NF4Tensor or MXFP4Tensor), which the lora_linear kernel reads packed and the reference dequantises."""

    def __init__(self, in_features: int, out_features: int, bias: bool, backend: Backend):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.backend = backend
        self.lora_A = self.lora_B = None
        self.scaling, self.dropout = 0.0, 0.0

    def add_lora(self, r: int, alpha: float, dropout: float, dtype=torch.float32):
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: nn.Linear's default on A, zeros on B
        self.scaling, self.dropout = alpha / r, dropout

    def forward(self, x):
        return self.backend.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                        self.dropout, self.training)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: Backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = LoraLinear(H, self.num_heads * self.head_dim, bias, backend)
        self.k_proj = LoraLinear(H, self.num_kv_heads * self.head_dim, bias, backend)
        self.v_proj = LoraLinear(H, self.num_kv_heads * self.head_dim, bias, backend)
        self.o_proj = LoraLinear(self.num_heads * self.head_dim, H, bias, backend)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        self.window = cfg.window(layer)
        self.backend = backend

    def forward(self, x, cos, sin, cu_seqlens):
        T = x.shape[0]
        q = self.backend.rope(self.q_proj(x).view(T, self.num_heads, self.head_dim), cos, sin)
        k = self.backend.rope(self.k_proj(x).view(T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        o = self.backend.attention(q, k, v, cu_seqlens, self.sinks, self.window, self.head_dim**-0.5)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.num_local_experts))


class Experts(nn.Module):
    """HF's GptOssExperts parameters (``gate_up_proj [E, H, 2I]`` interleaved gate/up, ``down_proj [E, I, H]``, their
    biases) and optional LoRA in PEFT's target_parameters layout (see fastft.kernels.moe).

    A weight may instead be held 4-bit (``set_quantized``): an MXFP4Tensor's blocks/scales become buffers and
    ``weight(name)`` returns an MXFP4Tensor, which the moe kernel reads directly; any other holder (NF4Tensor) is kept
    as an object (not in the state dict) and densified by the moe backend per call."""

    WEIGHTS = ("gate_up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))
        self.lora_scaling = {}  # weight name -> alpha / r, for the weights that carry LoRA
        self.holders = {}  # weight name -> a non-MXFP4 4-bit holder (NF4Tensor)

    def set_quantized(self, name: str, q):
        if name not in self.WEIGHTS:
            raise KeyError(name)
        self._parameters.pop(name, None)
        if isinstance(q, MXFP4Tensor):
            self.register_buffer(f"{name}_blocks", q.blocks)
            self.register_buffer(f"{name}_scales", q.scales)
        else:
            self.holders[name] = q

    def weight(self, name: str):
        if name in self._parameters:
            return self._parameters[name]
        if name in self.holders:
            return self.holders[name]
        return MXFP4Tensor(getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"))

    def weight_shape(self, name: str) -> tuple:  # [E, in, out]
        return tuple(self.weight(name).shape)

    def add_lora(self, name: str, r: int, alpha: float, dtype=torch.float32):
        E, fan_in, fan_out = self.weight_shape(name)
        device = getattr(self, "gate_up_proj_bias").device
        A = nn.Parameter(torch.empty(r * E, fan_in, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.register_parameter(f"{name}_lora_A", A)
        self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.zeros(fan_out, r * E, dtype=dtype, device=device)))
        self.lora_scaling[name] = alpha / r

    def lora(self, name: str):
        if name not in self.lora_scaling:
            return None
        return getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B"), self.lora_scaling[name]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.top_k, self.limit = cfg.num_experts_per_tok, cfg.swiglu_limit
        self.backend = backend
        self.chunk_tokens = None  # set through GptOssForTraining.moe_chunk_tokens

    def forward(self, x):
        n = self.chunk_tokens
        if n and torch.is_grad_enabled() and x.shape[0] > n:
            # The MoE keeps [top_k * T, 2I] intermediates for backward (6 GB per layer at 128K tokens): run it per
            # chunk under non-reentrant checkpoint so only one chunk's exist at a time, each recomputed in backward.
            return torch.cat([checkpoint(self._moe, c, use_reentrant=False, context_fn=recompute_skips_output)
                              for c in x.split(n)])
        return self._moe(x)

    def _moe(self, x):
        e = self.experts
        return self.backend.moe(x, self.router.weight, self.router.bias, self.top_k,
                                e.weight("gate_up_proj"), e.gate_up_proj_bias, e.weight("down_proj"), e.down_proj_bias,
                                e.lora("gate_up_proj"), e.lora("down_proj"), limit=self.limit)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: Backend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = Attention(cfg, layer, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend)

    def forward(self, h, cos, sin, cu_seqlens):
        # The MoE must stay the last op that saves anything: checkpoint recomputes this layer under
        # backends.output_unused, where the MoE's output is not computed (see recompute_skips_output).
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    """HF's ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Target of position i is labels[i + 1]; the last position of every document is ignored, so no document is
    trained to predict the next one's first token (whatever the data pipeline put there)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    # An empty document's "end" is -1 or the previous document's end: positions already ignored (no host sync).
    shifted[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return shifted


class LmHead(_HoldsQuantized, nn.Linear):
    """nn.Linear(H, V, bias=False) whose frozen weight may be held quantized instead (``set_quantized``: an
    Int8RowsTensor [V, H]); the loss backends take the holder as it is, ``dense(dtype)`` decodes it."""

    _what = "lm_head"

    def dense(self, dtype) -> torch.Tensor:
        return self.weight.dequantize(dtype) if self.quantized else self.weight.to(dtype)

    def loss_weight(self, dtype):
        """What the loss backend reads: the dense weight in ``dtype``, or the quantized holder as it is (the fused
        loss decodes it per vocabulary slab)."""
        return self.weight if self.quantized else self.weight.to(dtype)

    def forward(self, x):
        return F.linear(x, self.dense(x.dtype))


class GptOssForTraining(nn.Module):
    # DeepSpeed's bf16 engine casts every parameter except names matching these (RMSNorm weights): keeps them fp32.
    _keep_in_fp32_modules_strict = ["norm"]

    def __init__(self, cfg: ModelConfig, backend: Backend | None = None):
        super().__init__()
        self.config = cfg
        self.backend = backend if backend is not None else get_backend("torch")
        self.model = Body(cfg, self.backend)
        self.lm_head = LmHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._activation_offload = None  # a HostOffload while enable_gradient_checkpointing(offload=True)
        self._layer_graphs = None  # a LayerGraphs while use_layer_graphs(True)
        self.moe_chunk_tokens = 16384
        self._host_embedding = None  # set by offload_embedding
        self._inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self._inv_freq_by_device = {}  # kept off the module's buffers so .to(dtype) can never round it

    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype=torch.float32, device="cpu", backend: Backend | None = None):
        """Randomly initialised (HF's init: normal(0, initializer_range), zero biases, unit norms)."""
        with torch.device("meta"):
            model = cls(cfg, backend)
        model.to_dtype(dtype).to_empty(device=device)  # allocated in dtype: never a full-size fp32 copy
        return model.init_weights()

    @torch.no_grad()
    def init_weights(self):
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if "lora_" in name:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias") and "router" not in name:
                p.zero_()
            else:
                p.normal_(0.0, std)
        return self

    def to_dtype(self, dtype):
        """Casts the base weights to dtype; norm weights stay fp32, LoRA weights keep theirs."""
        for name, p in self.named_parameters():
            if not name.endswith("norm.weight") and "lora_" not in name:
                p.data = p.data.to(dtype)
        return self

    def offload_embedding(self):
        """Moves the frozen input embedding (0.58 B parameters, 1.16 GB bf16 for gpt-oss-20b) to host memory.

        A step touches only its T rows: they are gathered on the host and copied over (T x H x 2 bytes, 23.6 MB for
        4096 tokens), which costs far less than the GPU memory it frees. The tensor leaves the module's parameters,
        so ``.to(device)`` (DeepSpeed's included) cannot move it back. Tied or trainable embeddings stay put."""
        emb = self.model.embed_tokens
        if self._host_embedding is not None or "weight" not in emb._parameters:
            return self
        if self.config.tie_word_embeddings or emb.weight.requires_grad:
            raise ValueError("only a frozen, untied input embedding can be offloaded")
        host = emb.weight.detach().to("cpu")
        if torch.cuda.is_available():
            host = host.pin_memory()
        del emb._parameters["weight"]
        self._host_embedding = host
        return self

    def embed(self, input_ids):
        host = self._host_embedding
        if host is None:
            return self.model.embed_tokens(input_ids)
        ids = input_ids.cpu()
        if input_ids.device.type == "cpu":
            return F.embedding(ids, host)
        # gathered straight into pinned memory (the caching host allocator recycles it): one host pass, async H2D
        rows = torch.empty(ids.numel(), host.shape[1], dtype=host.dtype, pin_memory=True)
        torch.index_select(host, 0, ids, out=rows)
        return rows.to(input_ids.device, non_blocking=True)

    def quantize_lm_head(self, q="int8"):
        """Holds the frozen lm_head as int8 rows with one fp32 scale each (fastft.quant.Int8RowsTensor): half of
        bf16's bytes (0.54 GiB for gpt-oss-20b instead of 1.08). ``q`` is "int8" (quantise the current weight) or a
        holder made already (the loader's, quantised while streaming). The holder leaves the parameters: it is
        never trained, saved with an adapter or moved by ``.to()``; the fused loss reads it as it is. A lm_head tied
        to the input embedding is refused (the embedding must stay dense)."""
        if self.config.tie_word_embeddings:
            raise ValueError("the lm_head is tied to the input embedding (tie_word_embeddings): it cannot be held "
                             "int8 on its own")
        if isinstance(q, str):
            if q != "int8":
                raise ValueError(f"the lm_head can be quantised to 'int8', not {q!r}")
            if self.lm_head.quantized:
                return self
            from fastft.quant import Int8RowsTensor

            q = Int8RowsTensor.quantize(self.lm_head.weight.detach())
        self.lm_head.set_quantized(q)
        return self

    def lm_head_codes_to_host(self):
        """Moves the int8 lm_head's codes to pinned host memory (the scales stay on the GPU): the fused loss streams
        them slab by slab while its GEMMs run, so the GPU no longer holds the [V, H] codes (0.54 GiB for
        gpt-oss-20b). Needs an int8 lm_head on a CUDA device."""
        w = self.lm_head.weight
        if not self.lm_head.quantized:
            raise ValueError("only an int8 lm_head (quantize_lm_head) can keep its codes in host memory")
        if not w.codes_on_host:
            self.lm_head.set_quantized(w.codes_to_host())
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True, offload: bool = False):
        """Checkpoints every decoder layer (torch.utils.checkpoint, non-reentrant); with offload, the layer inputs it
        keeps for backward live in host memory (see fastft.model.offload)."""
        if offload and not enabled:
            raise ValueError("activation offload moves the inputs that checkpointing keeps: it needs checkpointing")
        self.gradient_checkpointing = enabled
        self._activation_offload = HostOffload() if offload else None

    def use_layer_graphs(self, enabled: bool = True, graphs: bool = True, max_graphs: int = 2,
                         pad_to: int = PAD_TO, keep_gib: float | str = 0):
        """With gradient checkpointing, runs the decoder layers of a training step through fastft.model.layer_graphs:
        checkpointed by hand and, on CUDA with ``graphs``, replayed from CUDA graphs (the host then issues 48 graph
        launches per step instead of ~1,200 kernels) for up to ``max_graphs`` token counts, padded to a multiple of
        ``pad_to``. Same math as torch's checkpoint; the dropout masks come from the same default generator. Steps
        whose MoE would run chunked (more than moe_chunk_tokens tokens) keep the torch.utils.checkpoint path.
        ``keep_gib``: device memory (GiB, or "auto": what is free after the first step, less a margin) for
        activations kept from the forward: first the experts' gate_up outputs (the recompute skips that GEMM), then
        whole layers (no recompute); 0 keeps nothing."""
        if keep_gib != "auto" and not (isinstance(keep_gib, (int, float)) and keep_gib >= 0):
            raise ValueError(f"keep_gib must be a number >= 0 or 'auto', not {keep_gib!r}")
        keep = keep_gib if keep_gib == "auto" else int(keep_gib * 2**30)
        opts = dict(graphs=graphs, max_graphs=max_graphs, pad_to=pad_to, keep=keep)
        self._layer_graphs = (opts, None) if enabled else None

    def _kept_bytes_per_token(self) -> int:
        """What one layer's stash holds per token: the experts' gate_up output (top_k rows of 2I activations) and,
        with expert LoRA, the fp32 rank-r products of both projections."""
        mlp = self.model.layers[0].mlp
        E, _, two_i = mlp.experts.weight_shape("gate_up_proj")
        ranks = [lora[0].shape[0] // E for lora in map(mlp.experts.lora, mlp.experts.WEIGHTS) if lora is not None]
        itemsize = mlp.experts.gate_up_proj_bias.element_size()  # the model's dtype (the embedding may be on the host)
        return mlp.top_k * (two_i * itemsize + 4 * sum(ranks))

    def _graphed_layers(self, tokens: int) -> LayerGraphs | None:
        if self._layer_graphs is None:
            return None
        opts, stack = self._layer_graphs
        params = [[(n, p) for n, p in layer.named_parameters() if p.requires_grad] for layer in self.model.layers]
        if stack is None or stack.offload != self.offload_activations or not stack.same_params(params):
            # new LoRA, frozen parameters or another offload setting: graphs captured for the old ones are stale
            stack = LayerGraphs(self.model.layers, params, offload=self.offload_activations,
                                keep_bytes_per_token=self._kept_bytes_per_token(), **opts)
            self._layer_graphs = (opts, stack)
        if self.moe_chunk_tokens and stack.padded(tokens) > self.moe_chunk_tokens:
            return None
        return stack

    def kept_layers(self) -> dict:
        """Padded token count -> (layers keeping their MoE's gate_up output on the device, layers keeping every
        activation, i.e. never recomputed, layers keeping the gate_up output in host memory, the share of its rows
        kept there), for each captured plan (metadata)."""
        stack = self._layer_graphs[1] if self._layer_graphs is not None else None
        return stack.kept() if stack is not None else {}

    @property
    def offload_activations(self) -> bool:
        return self._activation_offload is not None

    @property
    def moe_chunk_tokens(self) -> int | None:
        """With grad enabled, the MoE block runs over chunks of this many tokens (None: never chunked)."""
        return self._moe_chunk_tokens

    @moe_chunk_tokens.setter
    def moe_chunk_tokens(self, n: int | None):
        if n is not None and n < 1:
            raise ValueError(f"moe_chunk_tokens must be >= 1 or None, not {n}")
        self._moe_chunk_tokens = n
        for layer in self.model.layers:
            layer.mlp.chunk_tokens = n

    def set_backend(self, backend: Backend):
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    def rope(self, position_ids, dtype):
        device = position_ids.device
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq.to(device)
        freqs = position_ids.float()[:, None] * self._inv_freq_by_device[device][None, :]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    def hidden_states(self, input_ids, position_ids, cu_seqlens):
        """Final-norm hidden states [T, H] of a packed stream."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and position_ids must both be [T]; got {tuple(input_ids.shape)} and "
                             f"{tuple(position_ids.shape)}")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor")
        h = self.embed(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        stack = self._graphed_layers(h.shape[0]) if checkpointing else None
        if stack is not None:
            return self.model.norm(stack(h, cos, sin, cu_seqlens))
        offload = self._activation_offload if checkpointing else None
        if offload is not None:
            offload.begin()
        for layer in self.model.layers:
            if not checkpointing:
                h = layer(h, cos, sin, cu_seqlens)
                continue
            with offload.saving(h) if offload is not None else contextlib.nullcontext():
                h = checkpoint(layer, h, cos, sin, cu_seqlens, use_reentrant=False,
                               context_fn=recompute_skips_output)
        return self.model.norm(h)

    def logits(self, input_ids, position_ids, cu_seqlens):
        """[T, V] logits (tests and evaluation; training goes through the fused loss)."""
        h = self.hidden_states(input_ids, position_ids, cu_seqlens)
        return self.lm_head(h)

    def forward(self, input_ids, position_ids, cu_seqlens, labels=None):
        """Mean token loss (fp32 scalar) over unshifted HF-style labels; logits when labels is None."""
        if labels is None:
            return self.logits(input_ids, position_ids, cu_seqlens)
        h = self.hidden_states(input_ids, position_ids, cu_seqlens)
        return self.backend.loss(h, self.lm_head.loss_weight(h.dtype), shift_labels(labels, cu_seqlens),
                                 ignore_index=IGNORE_INDEX)
