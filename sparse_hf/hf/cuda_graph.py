"""CUDA-graph decode for sparse-hf caches.

After the prompt, every sparse-hf cache layer is in *decode mode*: fixed buffers, appends at a device-side
slot counter, attention by Triton kernels over the whole buffer with ``-1`` for empty slots, and no
host-device sync. A decode step of the model therefore has static shapes, and one captured step can be
replayed for every following token. Host-side bookkeeping (slot counts, StreamingLLM's trimming, which
keeps the same buffers) runs eagerly between replays. When a layer runs out of room the step runs
eagerly (the buffers grow) and the graph is captured again.
"""

from __future__ import annotations

import warnings

import torch

from ..kernels.capture import capture_stream, no_collection_during_capture
from .compat import cache_argument


class GraphDecoder:
    """Greedy decode steps of ``model`` with a sparse-hf ``cache``, replayed from a CUDA graph.

    Args:
        model: a causal LM prepared with :func:`sparse_hf.prepare_model`.
        cache: a sparse-hf cache whose prompt is complete.

    Use ``logits = decoder.step(input_ids [B, 1], position_ids [B, 1])``; logits are ``[B, vocab]``.
    """

    def __init__(self, model, cache, forward=None):
        self.cache = cache
        # the model's own forward, not sparse-hf's graph-replaying wrapper (a capture must not replay a graph)
        self.forward = forward or getattr(model.forward, "__wrapped__", model)
        self.graph = None
        self.signature = None
        self.static_ids = self.static_pos = self.static_logits = None
        self.captures = 0
        self.disabled = False

    def _signature(self):
        # every buffer a captured step reads or writes: a growth (new buffers) forces a re-capture
        return tuple(layer.buffer_signature() for layer in self.cache.layers)

    def _room(self) -> bool:
        eager = getattr(self.cache, "eager_step_reason", None)   # DeltaKV: a flush / scratch re-size step
        return (all(layer.frozen and layer.num_slots < layer.capacity for layer in self.cache.layers)
                and (eager is None or eager() is None))

    def _eager(self, input_ids, position_ids):
        out = self.forward(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                           **{cache_argument(self.forward): self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.disabled or not input_ids.is_cuda or not self._room():
            return self._eager(input_ids, position_ids)
        if self.graph is None or self.signature != self._signature() or self.static_ids.shape != input_ids.shape:
            logits = self._warm_step(input_ids, position_ids)
            if self._room():
                self._capture(input_ids)
            return logits
        self.static_ids.copy_(input_ids)
        self.static_pos.copy_(position_ids)
        self.graph.replay()
        self.cache.advance(1)
        for i in range(len(self.cache.layers)):
            self.cache.maintain_layer(i)
        return self.static_logits[:, -1]

    def _warm_step(self, input_ids, position_ids):
        """A real decode step on a side stream (CUDA graphs want libraries initialised off the capture)."""
        stream = capture_stream(input_ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._eager(input_ids, position_ids)
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def _capture(self, like_ids):
        self.static_ids = torch.zeros_like(like_ids)
        self.static_pos = torch.zeros_like(like_ids)
        graph = torch.cuda.CUDAGraph()
        host = [(layer.num_slots, layer.seen) for layer in self.cache.layers]
        self.cache.capturing = True
        try:
            with no_collection_during_capture(), torch.cuda.graph(graph):
                out = self.forward(input_ids=self.static_ids, position_ids=self.static_pos, use_cache=True,
                                   **{cache_argument(self.forward): self.cache})
            self.static_logits = out.logits
        except Exception as e:  # pragma: no cover - depends on the model code
            warnings.warn(f"sparse-hf: CUDA-graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
            self.disabled = True
            self.graph = None
            return
        finally:
            self.cache.capturing = False
            for layer, (slots, seen) in zip(self.cache.layers, host):   # the capture ran no device work
                layer.num_slots, layer.seen = slots, seen
                layer._refresh_views()
        self.graph = graph
        self.signature = self._signature()
        self.captures += 1
