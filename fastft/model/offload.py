"""Checkpointed layer inputs kept in host memory between forward and backward.

With per-layer checkpointing the only activation a layer keeps for backward is its input hidden state [T, H]; over
24 layers that is what grows with T (24 x 128K x 2880 x 2 B = 17.7 GB at 128K tokens). ``HostOffload`` moves each
of those inputs to pinned host memory while the layer runs and brings it back during backward one layer ahead of need.

Why saved-tensor hooks around torch's non-reentrant checkpoint, not a reentrant autograd.Function: non-reentrant
``checkpoint`` saves its inputs as ordinary saved tensors, packed by the hooks active at the call (the region's own
saves go to checkpoint's inner hooks), so wrapping the call moves exactly the layer input and nothing else. The rest
stays torch's: one backward pass in which LoRA gradients reach ``.grad`` through the normal AccumulateGrad nodes (so
DeepSpeed ZeRO-2's gradient hooks fire as without offload), RNG replay for dropout, nested checkpoints (the chunked
MoE), and no requires-grad dummy input for layers whose input comes from a frozen embedding.

Streams (CUDA): one side stream carries the copies in both directions, so a layer's copy back never overtakes its
copy out. Copy out: the side stream waits for the producer, copies page by page into pinned host memory, and
``record_stream`` keeps the caching allocator from reusing the GPU tensor's memory until that copy is done, however
soon the forward drops it. Copy back: the destination is allocated on the compute stream (its memory is then free of
earlier compute-stream users once the side stream waits for the compute stream), filled on the side stream, and the
compute stream waits on the copy's event before using it. Pinned pages stay referenced until the graph frees the
handle, and torch's pinned allocator records the copies' events, so no page is reused while a copy is in flight.

Pages: the pinned caching allocator rounds every block up to a power of two, which would take up to twice the
host memory for one [T, H] block (4 GB instead of 2.9 GB per layer at 500K tokens); fixed 64 MiB pages waste at most
the last page of each layer. On CPU the same path runs with plain host tensors and no streams (tests).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

PAGE_BYTES = 64 << 20


class HostOffload:
    """Saved-tensor hooks that move the hidden state a checkpointed layer starts from to host memory.

    Use ``begin()`` once per forward pass, then for each layer::

        with offload.saving(h):
            h = checkpoint(layer, h, ..., use_reentrant=False)
    """

    def __init__(self, page_bytes: int = PAGE_BYTES):
        self.page_bytes = page_bytes
        self._streams = {}  # device -> side stream for host copies
        # weak: only the autograd graph owns a handle (and its host pages); backward drops them layer by layer
        self._last = _dead  # the previous layer's handle, prefetched once this layer's input is unpacked

    def begin(self):
        """A new forward pass: its first layer has no predecessor to prefetch."""
        self._last = _dead

    @contextlib.contextmanager
    def saving(self, hidden: torch.Tensor):
        # Only the address and shape are kept: autograd holds on to the pack hook for as long as the saved tensor
        # lives, so a closure over `hidden` itself would pin on the device the very tensor this moves off it.
        ptr, shape = hidden.data_ptr(), hidden.shape
        del hidden

        def pack(t):
            # checkpoint also saves cos/sin/cu_seqlens: small and shared by every layer, they stay where they are
            if t.data_ptr() != ptr or t.shape != shape or t.dim() == 0:
                return t
            handle = _HostCopy(t, self.page_bytes, self._stream(t.device), self._last)
            self._last = weakref.ref(handle)
            return handle

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield

    def _stream(self, device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


def _dead():
    return None


def _unpack(packed):
    return packed.unpack() if isinstance(packed, _HostCopy) else packed


class _HostCopy:
    """One tensor's copy in host pages (rows split along dim 0); ``prev`` weakly refers to the handle packed just
    before it."""

    def __init__(self, t: torch.Tensor, page_bytes: int, stream, prev):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.stream, self.prev, self._ready = stream, prev, None
        rows = t.detach().reshape(t.shape[0], -1)
        step = max(1, page_bytes // max(1, rows.shape[1] * rows.element_size()))
        pin = stream is not None
        with on_side_stream(stream):
            self.pages = [_host_like(part, pin).copy_(part, non_blocking=pin) for part in rows.split(step)]
        if pin:
            t.record_stream(stream)

    def prefetch(self):
        """Starts the copy back to the device (no-op when it is already under way)."""
        if self._ready is not None:
            return
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        rows = out.view(self.shape[0], -1)
        with on_side_stream(self.stream):
            start = 0
            for page in self.pages:
                rows[start:start + page.shape[0]].copy_(page, non_blocking=self.stream is not None)
                start += page.shape[0]
            event = self.stream.record_event() if self.stream is not None else None
        if self.stream is not None:
            out.record_stream(self.stream)  # a handle dropped before unpack must not free memory still being written
        self._ready = (out, event)

    def unpack(self) -> torch.Tensor:
        self.prefetch()
        (out, event), self._ready = self._ready, None  # the handle keeps the host copy, not the device one
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        prev = self.prev()
        if prev is not None:
            prev.prefetch()  # the layer below: copied while this one recomputes and runs backward
        return out


def _host_like(t, pin: bool):
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


@contextlib.contextmanager
def on_side_stream(stream):
    """Runs the enclosed copies on ``stream`` after the work already queued on the compute stream."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield
