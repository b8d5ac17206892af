"""The decoder layers of a training step replayed from CUDA graphs: 48 graph launches instead of ~1,200 kernels.

Why: a gpt-oss-20b step over 4096 tokens is ~230 ms of kernels, and the host needs about as long to issue them one
at a time (Python, autograd nodes, checkpoint hooks, Triton's launcher; measured on an H200 host: ~220 ms per step
with 256-token rows, where the GPU work is small). The step was as slow as its host. Replayed graphs cost the host
microseconds, so the step runs at the GPU's pace on any host.

How: per-layer activation checkpointing done by hand (the reentrant style) so each half is one fixed sequence of
kernels on fixed buffers:

    forward, layer i:   under no_grad, slot i -> layer -> slot i+1           (the layer input is all that is kept)
    backward, layer i:  recompute layer i from slot i under enable_grad and backends.output_unused, then
                        autograd.grad(out, [x, LoRA params], g) -> the gradient of slot i, the params' grads

One autograd Function (``_Stack``) spans all layers: its forward runs the 24 forward halves, its backward the 24
backward halves, and it returns every trainable parameter's gradient through autograd (so AccumulateGrad and
DeepSpeed's gradient hooks see them as usual). A ``_Plan`` owns the fixed buffers of one token count:

- Tokens are padded up to a multiple of ``pad_to`` (one extra document of zero hidden states; its rows get zero
  upstream gradient, so it adds exactly nothing to any parameter's gradient), and cu_seqlens to T_pad + 1 entries
  (trailing empty documents), so the rows of any step of that size replay the same graphs.
- Slots: with activation offload, two device buffers used in turn plus one pinned host buffer per layer; the
  forward of layer i copies its input to the host on a side stream while it computes, the backward of layer i
  copies layer i-1's input back the same way. Without offload, one device buffer per layer (what checkpointing keeps).
- Kept activations, within ``keep`` bytes ("auto": the device memory still free when the plan is made, less a
  margin): first every layer's MoE keeps its gate_up output from the forward (an ActivationStash,
  ``keep_bytes_per_token`` per token and layer: 46 KB for gpt-oss-20b, 4.2 GiB for 24 layers at 4096 tokens), so
  its recompute skips the expert gate_up GEMM, a quarter of the step's expert FLOPs; then, with what is left, the
  last layers keep their whole autograd graph (the forward runs with autograd, the backward recomputes nothing; a
  layer's size is measured on the first step's recompute). With "auto" only captured plans keep (the first step,
  eager, shows what is free); a second forward issued before the first one's backward keeps nothing.
- Spilled activations: with offload, when the budget holds at least two layers' h but not all, the layers below the
  kept ones keep theirs in pinned host memory, written through the buffers of the two lowest kept layers in turn
  (layer i's and layer i + 2's are the same): layer i's h leaves on the side stream during layer i + 1's forward
  and comes back during layer i + 1's backward. Only the share of its rows that the link moves in one layer forward
  goes (``spill_share``), the recompute computes the rest; at 4096 tokens 22 layers spilling 63-70 % of their h
  saved 15 ms of a 0.24 s step for 0.56 GiB (benchmarks/ANALYSIS.md).
- Dropout: the masks come from the default generator, whose offset is noted before each layer's forward and set
  back to it before that layer's recompute (then to the forward's end), so the recompute draws the same masks; a
  graph replay draws at the generator's current offset, so this holds for replays as for eager runs.

The first call with a given token count runs these halves eagerly (every Triton kernel compiles and autotunes for
those shapes there, never during a capture); the second captures them and later calls replay. Up to
``max_graphs`` token counts are captured (all graphs share one memory pool: only one step runs at a time, and what
outlives a graph - the slots, the parameter gradients, attention's document tables - stays referenced); other sizes
keep running eagerly, as does a second forward issued before the first one's backward (the captured buffers are
taken until then). Off CUDA the eager halves run (tests compare them with torch.utils.checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

from fastft.backends import ActivationStash, output_unused, stashing
from fastft.model.offload import on_side_stream

PAD_TO = 256


def _free_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such query here: assume room
        return 1 << 62


def spare_device_memory(device: torch.device) -> int:
    """Bytes a new allocation may still take on ``device``: free memory (within torch's per-process fraction, if
    one is set) less 10 % of the device and 1 GiB, for the optimizer state, fragmentation and other processes. Made
    after a first step, so the memory that step's transients need is already reserved."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    free = min(free, int(frac * total) - torch.cuda.memory_reserved(device))
    return max(0, free - int(0.1 * frac * total) - (1 << 30))


class _Rng:
    """Mark / rewind the generator the dropout masks come from (the default one of the device)."""

    def __init__(self, device: torch.device):
        self.gen = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else None

    def mark(self):
        return self.gen.get_offset() if self.gen is not None else torch.get_rng_state()

    def rewind(self, mark):
        if self.gen is not None:
            self.gen.set_offset(mark)
        else:
            torch.set_rng_state(mark)


class _Plan:
    """Buffers (and, once captured, the graphs) for one padded token count."""

    def __init__(self, stack: "LayerGraphs", t_pad: int, like: torch.Tensor, cos: torch.Tensor, need_h: bool,
                 graphed: bool, kept: tuple[int, int, int] = (0, 0, 0)):
        self.stack, self.t_pad, self.need_h, self.graphed = stack, t_pad, need_h, graphed
        L, H, dev = len(stack.layers), like.shape[1], like.device
        # the last `whole` layers keep everything, the `stashed` before them their MoE's h on the device, and the
        # `spilled` before those theirs in host memory, through the device buffers of the first two stashed layers
        stashed, whole, spilled = kept
        first = L - whole - stashed
        self.whole = [_Whole() if i >= L - whole else None for i in range(L)]
        self.stashes = [ActivationStash() if first <= i < L - whole else None for i in range(L)]
        for i in range(first - spilled, first):  # layer i's buffers are layer i + 2's: its h leaves in between
            self.stashes[i] = ActivationStash(shared_with=self.stashes[first + (i - first) % 2], spill_share=0.0)
        self.spilled = [i < first and self.stashes[i] is not None for i in range(L)]
        # set once layer 0's forward is captured (timed from its replay), before any copy is made or captured
        self.spill_share = None if spilled else 0.0
        self.spill_host = [None] * L  # spilled layer -> {name: pinned host copy}, made after its first forward
        cuda = dev.type == "cuda"
        new = lambda: torch.zeros(t_pad, H, dtype=like.dtype, device=dev)  # noqa: E731
        self.offload = stack.offload
        self.slots = [new(), new()] if self.offload else [new() for _ in range(L + 1)]
        self.host = [torch.empty(t_pad, H, dtype=like.dtype, pin_memory=cuda) for _ in range(L)] \
            if self.offload else None
        self.grad = [new(), new()]
        self.cos = torch.zeros(t_pad, cos.shape[1], dtype=cos.dtype, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.cu = torch.zeros(t_pad + 1, dtype=torch.int32, device=dev)
        self.side = torch.cuda.Stream(dev) if cuda else None
        self._forked = False
        self.rng = _Rng(dev)
        self.marks, self.end = [None] * L, None
        self.param_grads = [None] * L
        self.fwd_graphs, self.bwd_graphs = [None] * L, [None] * L
        self._owner = None  # weakref to the autograd node of the step whose backward still needs these buffers

    def claim(self, ctx):
        self._owner = weakref.ref(ctx)  # a graph discarded without its backward frees the buffers with its node

    def release(self):
        self._owner = None

    @property
    def busy(self) -> bool:
        return self._owner is not None and self._owner() is not None

    def slot(self, i: int) -> torch.Tensor:
        return self.slots[i % 2] if self.offload else self.slots[i]

    # ---- inputs / outputs -----------------------------------------------------------------------------------------
    def load(self, h, cos, sin, cu_seqlens):
        T = h.shape[0]
        x = self.slot(0)
        x[:T].copy_(h)
        x[T:].zero_()
        self.cos[:T].copy_(cos)
        self.sin[:T].copy_(sin)
        n = cu_seqlens.shape[0]
        self.cu[:n].copy_(cu_seqlens)
        self.cu[n:].fill_(self.t_pad)  # the padding rows form one document, then empty ones

    # ---- the two halves of a layer (run eagerly, or captured once and replayed) ----------------------------------
    def _fork(self):
        """Copies on the side stream, after what the compute stream queued so far; ``_join`` makes the compute stream
        wait for them (under capture, a join without a fork would depend on work outside the graph)."""
        self._forked = self.side is not None
        return on_side_stream(self.side)

    def _join(self):
        if self._forked:
            torch.cuda.current_stream().wait_stream(self.side)
            self._forked = False

    def _forward_half(self, i: int):
        x_in = self.slot(i)
        spill = i > 0 and self.spilled[i - 1]
        if self.offload or spill:
            with self._fork():  # overlapping this layer's compute
                if self.offload:
                    self.host[i].copy_(x_in, non_blocking=self.side is not None)
                if spill:  # before layer i + 1 writes its buffers
                    self._spill(i - 1, out=True)
        if self.whole[i] is not None:
            self._forward_keeping_graph(i, x_in)
        else:
            with torch.no_grad(), stashing(self.stashes[i]):
                out = self.stack.layers[i](x_in, self.cos, self.sin, self.cu)
                self.slot(i + 1).copy_(out)
            del out
        self._join()

    def _with_autograd(self, i: int, x_in: torch.Tensor):
        """Layer i on x_in with autograd: (output, the inputs whose gradients the backward half takes: x unless it
        is layer 0's input and h needs none, then the trainable parameters). The layer reads fresh leaves aliasing
        those parameters (same storage, so a replay sees the optimizer's updates): the parameters' own AccumulateGrad
        nodes belong to the stream of the step's forward, and autograd would make that stream wait on the capture."""
        need_x = i > 0 or self.need_h
        aliases = {name: p.detach().requires_grad_() for name, p in self.stack.params[i]}
        with torch.enable_grad():
            x = x_in.detach().requires_grad_(need_x)
            out = torch.func.functional_call(self.stack.layers[i], aliases, (x, self.cos, self.sin, self.cu))
        return out, ([x] if need_x else []) + list(aliases.values())

    def _forward_keeping_graph(self, i: int, x_in: torch.Tensor):
        """Layer i forward with autograd, its graph (every saved activation) kept for the backward half."""
        w = self.whole[i]
        if self.offload:  # the slot is the next-but-one layer's input too: the graph keeps a copy
            w.x = torch.empty_like(x_in) if w.x is None else w.x  # allocated once, at a fixed address
            x_in = w.x.copy_(x_in)
        w.out, w.inputs = self._with_autograd(i, x_in)
        self.slot(i + 1).copy_(w.out.detach())

    def _spill(self, i: int, out: bool):
        """Copies spilled layer i's stash to its host copy (out) or back into the shared device buffers."""
        for name, (buf, rows) in self.stashes[i].written().items():
            dst, src = (self.spill_host[i][name], buf[:rows]) if out else (buf[:rows], self.spill_host[i][name])
            dst.copy_(src, non_blocking=self.side is not None)

    def _host_copies(self, i: int):
        """Pinned host tensors for spilled layer i's stash, shaped after what its first forward wrote (made between
        graph captures: a pinned allocation is not a stream operation)."""
        if self.spilled[i] and self.spill_host[i] is None:
            self.spill_host[i] = {name: torch.empty((rows, *buf.shape[1:]), dtype=buf.dtype,
                                                    pin_memory=buf.device.type == "cuda")
                                  for name, (buf, rows) in self.stashes[i].written().items()}

    def _backward_half(self, i: int):
        spill = i > 0 and self.spilled[i - 1]
        if (self.offload or spill) and i > 0:  # layer i-1's input (and stash) come back while layer i recomputes
            with self._fork():
                if self.offload:
                    self.slot(i - 1).copy_(self.host[i - 1], non_blocking=self.side is not None)
                if spill:
                    self._spill(i - 1, out=False)
        need_x = i > 0 or self.need_h
        w = self.whole[i]
        if w is not None:  # no recompute; a captured graph is walked again at every replay, so it is retained
            out, inputs = w.out, w.inputs
            if not self.graphed:
                w.out = w.inputs = None
        else:
            with output_unused(), stashing(self.stashes[i]), self.stack.measuring(self, i):
                out, inputs = self._with_autograd(i, self.slot(i))
        grads = list(torch.autograd.grad(out, inputs, self.grad[(i + 1) % 2], allow_unused=True,
                                         retain_graph=w is not None and self.graphed)) if inputs else []
        del out, inputs
        if need_x:
            self.grad[i % 2].copy_(grads.pop(0))
        self.param_grads[i] = grads
        self._join()

    def _run(self, graphs, i: int, half):
        if not self.graphed:
            half(i)
            return
        if graphs[i] is None:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.stack.pool(), capture_error_mode="thread_local"):
                half(i)
            graphs[i] = g
        graphs[i].replay()

    # ---- a step ---------------------------------------------------------------------------------------------------
    def forward(self):
        for i in range(len(self.stack.layers)):
            self.marks[i] = self.rng.mark()
            self._run(self.fwd_graphs, i, self._forward_half)
            if self.spill_share is None:  # layer 0 spills: its h first leaves in layer 1's forward
                self._set_spill_share(self.stack.spill_share(self.t_pad, self.slots[0], self._replay_seconds(0)))
            self._host_copies(i)
        self.end = self.rng.mark()

    def _replay_seconds(self, i: int) -> float | None:
        """GPU time of layer i's captured forward, replayed once more (same input, same dropout masks: the generator
        is set back to where that forward started, so the replay rewrites what it wrote)."""
        if self.fwd_graphs[i] is None:
            return None
        self.rng.rewind(self.marks[i])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.fwd_graphs[i].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _set_spill_share(self, share: float):
        self.spill_share = share
        for st, spilled in zip(self.stashes, self.spilled):
            if spilled:
                st.spill_share = share

    def backward(self, g):
        T = g.shape[0]
        top = self.grad[len(self.stack.layers) % 2]
        top[:T].copy_(g)
        top[T:].zero_()
        for i in reversed(range(len(self.stack.layers))):
            self.rng.rewind(self.marks[i])
            self._run(self.bwd_graphs, i, self._backward_half)
        self.rng.rewind(self.end)


class _Whole:
    """A layer whose forward keeps its autograd graph: the static input copy (with offload), output and inputs."""

    def __init__(self):
        self.x = self.out = None
        self.inputs = []


class _Stack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, plan, cos, sin, cu_seqlens, *params):
        plan.load(h, cos, sin, cu_seqlens)
        plan.forward()
        ctx.plan, ctx.T = plan, h.shape[0]
        plan.claim(ctx)
        return plan.slot(len(plan.stack.layers))[: h.shape[0]].clone()

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        plan.release()
        plan.backward(g.contiguous())
        gh = plan.grad[0][: ctx.T].clone() if plan.need_h else None
        return (gh, None, None, None, None, *[x for grads in plan.param_grads for x in grads])


class LayerGraphs:
    """Runs a model's decoder layers as described above: ``stack(h, cos, sin, cu_seqlens)`` for
    ``for layer in layers: h = checkpoint(layer, h, cos, sin, cu_seqlens)``. ``params[i]``: layer i's trainable
    parameters as (name in the layer, parameter) pairs (their gradients are what the backward returns)."""

    def __init__(self, layers, params, offload: bool, graphs: bool = True, max_graphs: int = 2, pad_to: int = PAD_TO,
                 keep: float | str = 0, keep_bytes_per_token: int = 0):
        self.layers, self.params = list(layers), params
        self.offload, self.graphs, self.max_graphs, self.pad_to = offload, graphs, max_graphs, pad_to
        self.keep, self.keep_bytes_per_token = keep, keep_bytes_per_token
        self.whole_bytes_per_token = None  # what a layer's autograd graph holds per token, measured once
        self.spill_share_override = None
        self._layer_seconds = {}  # padded token count -> a layer forward's GPU time (a captured plan's replay)
        self._rate = None  # device-to-host bytes per second
        self._plans = {}  # key -> captured _Plan
        self._seen = set()
        self._pool = None

    def same_params(self, params) -> bool:
        return len(params) == len(self.params) and all(
            len(a) == len(b) and all(x[1] is y[1] for x, y in zip(a, b)) for a, b in zip(params, self.params))

    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def padded(self, tokens: int) -> int:
        return -(-tokens // self.pad_to) * self.pad_to

    def _plan(self, h, cos):
        t_pad = self.padded(h.shape[0])
        key = (t_pad, h.dtype, h.device, h.requires_grad)
        plan = self._plans.get(key)
        if plan is not None:
            if not plan.busy:
                return plan
            capture = keep = False  # a second forward before the first one's backward: the captured buffers are taken
        else:
            capture = (self.graphs and h.device.type == "cuda" and key in self._seen
                       and len(self._plans) < self.max_graphs)
            keep = capture or self.keep != "auto"  # "auto" measures what the first step left free
            self._seen.add(key)
        kept = self.kept_layers(t_pad, h.device) if keep else (0, 0, 0)
        plan = _Plan(self, t_pad, h, cos, h.requires_grad, graphed=capture, kept=kept)
        if capture:
            self._plans[key] = plan
        return plan

    def kept_layers(self, t_pad: int, device: torch.device) -> tuple[int, int, int]:
        """(layers that keep their MoE's h on the device, layers that keep their whole autograd graph, layers that
        keep h in host memory) of a plan for ``t_pad`` tokens, within the ``keep`` budget: first h for every layer
        (the most recompute saved per byte: the expert gate_up GEMM), then, with what is left, whole layers (no
        recompute at all; their size is measured on the first step's recompute). With activation offload and room
        for at least two layers' h but not for all, the layers below spill theirs to host memory (spill_share)."""
        per_h = t_pad * self.keep_bytes_per_token
        if per_h <= 0 or not self.keep:
            return 0, 0, 0
        L = len(self.layers)
        budget = spare_device_memory(device) if self.keep == "auto" else float(self.keep)
        stashed = max(0, min(L, int(budget // per_h)))
        if stashed < L or self.whole_bytes_per_token is None:
            host = (L - stashed) * per_h  # at most: every row of the spilled layers' h
            spill = (self.offload and 2 <= stashed < L and host <= 0.5 * _free_host_bytes()
                     and (device.type == "cuda" or self.spill_share_override is not None))
            return stashed, 0, L - stashed if spill else 0
        extra = t_pad * self.whole_bytes_per_token - per_h  # a whole layer's graph holds h too
        whole = min(L, int((budget - L * per_h) // extra)) if extra > 0 else L
        return L - whole, whole, 0

    def spill_share(self, t_pad: int, like: torch.Tensor, seconds: float | None) -> float:
        """The share of a spilled layer's h rows that goes to host memory: what the host link moves while the next
        layer computes (a longer copy would stall the forward at every layer, while each row left behind only costs
        its share of the gate_up GEMM in the recompute). ``seconds``: a layer forward's GPU time, from the replay of
        a captured plan's layer 0 (kept per token count for later eager plans of that size: None asks for it); the
        link's device-to-host rate comes from one 64 MiB copy. 0 (everything recomputed) without a measurement or
        when under a tenth of h would move; ``spill_share_override`` fixes it (tests, A/B runs)."""
        if self.spill_share_override is not None:
            return self.spill_share_override
        if seconds is not None:
            self._layer_seconds[t_pad] = seconds
        seconds = self._layer_seconds.get(t_pad)
        if seconds is None or like.device.type != "cuda":
            return 0.0
        movable = 0.9 * seconds * self._link_rate(like.device) - (t_pad * like[0].nbytes if self.offload else 0)
        share = min(1.0, movable / (t_pad * self.keep_bytes_per_token))  # the layer input goes too (offload)
        return share if share >= 0.1 else 0.0

    def _link_rate(self, device: torch.device) -> float:
        """Device-to-pinned-host copy rate in bytes per second (one 64 MiB copy, measured once)."""
        if self._rate is None:
            src = torch.empty(64 << 20, dtype=torch.uint8, device=device)
            dst = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            dst.copy_(src, non_blocking=True)  # warm-up: first-touch costs
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            self._rate = src.numel() / (start.elapsed_time(end) / 1e3)
        return self._rate

    @contextlib.contextmanager
    def measuring(self, plan: _Plan, i: int):
        """Around the first eager recompute: sums the activations its autograd graph saves (storage bytes, each
        once; parameters and the plan's own buffers excluded), plus the layer output a kept graph holds and, with
        offload, its input copy."""
        if self.whole_bytes_per_token is not None or plan.graphed:
            yield
            return
        fixed = {t.untyped_storage().data_ptr() for t in (*self.layers[i].parameters(), *self.layers[i].buffers(),
                                                          *plan.slots, *plan.grad, plan.cos, plan.sin, plan.cu)}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in fixed:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        x = plan.slot(i)
        extra = x.numel() * x.element_size() * (2 if plan.offload else 1)
        self.whole_bytes_per_token = -(-(sum(saved.values()) + extra) // plan.t_pad)

    def kept(self) -> dict:
        """Padded token count -> (layers keeping their MoE's h on the device, layers keeping everything, layers
        keeping h in host memory, the share of their h rows that goes there), captured plans."""
        return {key[0]: (sum(st is not None and not sp for st, sp in zip(plan.stashes, plan.spilled)),
                         sum(w is not None for w in plan.whole), sum(plan.spilled), plan.spill_share or 0.0)
                for key, plan in self._plans.items()}

    def __call__(self, h, cos, sin, cu_seqlens):
        plan = self._plan(h, cos)
        return _Stack.apply(h, plan, cos, sin, cu_seqlens, *[p for ps in self.params for _, p in ps])
