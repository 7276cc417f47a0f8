"""CUDA-graph decode, one graph per batch-size bucket, and the activation profile that sizes the pool.

A decode step has static shapes: every input lives in a preallocated buffer (a
:class:`~.decode_inputs.DecodeInputs`: token ids, positions, batch rows, slot counts ``[G, B]`` uploaded in one
copy, and the slot mapping ``[G, B]``); the graph gathers the first ``w`` columns of the rows' slot tables
(``w`` a power-of-two bucket of the longest row; the kernels stop at each row's count) and runs the model and the
LM head. A batch of ``B`` rows replays the graph of the smallest bucket ``b >= B`` (captured on first use); the
``b - B`` padding rows write to the pool's scratch slot and attend to nothing.
Slot allocation, sampling and eviction happen outside the graph.
"""

from __future__ import annotations

import torch

from ..kernels.capture import capture_stream, no_collection_during_capture
from .attention import StepContext
from .decode_inputs import DecodeInputs


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs`` (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def width_bucket(width: int, max_len: int) -> int:
    """Slot-table columns a graph reads: the next power of two >= ``width`` (at least 256), at most ``max_len``."""
    w = 256
    while w < width:
        w *= 2
    return min(w, max_len)


def capture_step(forward, mempool) -> "torch.cuda.CUDAGraph":
    """Run ``forward()`` once on the device's capture stream (warm-up: Triton compilation, allocator, cuBLAS
    workspace), then capture it into a new graph in ``mempool``."""
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
        graph = torch.cuda.CUDAGraph()
        with no_collection_during_capture(), torch.cuda.graph(graph, pool=mempool, stream=stream):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``pool``, keyed by (batch bucket, table-width bucket) and captured
    on first use; ``attention`` is the :class:`~.attention.PoolAttention` the model calls."""

    def __init__(self, model, pool, max_num_seqs: int, attention):
        self.model, self.pool, self.attention = model, pool, attention
        self.buckets = batch_buckets(max_num_seqs)
        dev, B = pool.device, max(self.buckets)
        self.inputs = DecodeInputs(B, pool.num_groups, pool.scratch_slot, dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # One output buffer for every graph, so no graph keeps its own [b, V] logits alive in the graph pool.
        self.logits = torch.zeros(B, model.config.vocab_size, dtype=torch.float32, device=dev)
        self.mempool = None                                  # one graph memory pool, made at the first capture

    def _forward(self, b: int, w: int) -> None:
        inp = self.inputs
        tables = self.pool.tables[:, :, :w].index_select(1, inp.rows[:b])             # [G, b, w]
        self.attention.ctx = StepContext(inp.slot_mapping[:, :b], tables=tables, lens=inp.lens[:, :b])
        self.model.logits(self.model(inp.ids[:b], inp.positions[:b]), out=self.logits[:b])
        self.attention.ctx = None

    def _capture(self, b: int, w: int) -> None:
        """Warm up (Triton compilation) and capture. The warm-up runs on the step's real inputs: it writes the
        same K/V to the same slots as the replay that follows, so it changes nothing (see :meth:`_capture_forward`
        for what is not idempotent)."""
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        self.graphs[(b, w)] = capture_step(self._capture_forward(b, w), self.mempool)

    def _capture_forward(self, b: int, w: int):
        """The step :func:`capture_step` calls twice: a warm-up that runs, then the capture that only records (the
        replay that follows runs it). The warm-up runs with ``attention.warm_up`` set, so that work which must
        happen once per step (H2O's accumulation of the step's attention mass) runs its kernels but not its
        side effect."""
        calls = []

        def forward():
            self.attention.warm_up = not calls
            calls.append(None)
            try:
                self._forward(b, w)
            finally:
                self.attention.warm_up = False
        return forward

    def release(self) -> None:
        """Drop every captured graph and the graph memory pool, so their memory returns to the allocator at once
        (a graph's private pool is freed only when the graph object dies)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.mempool = None
        # A caller may still hold this object (a benchmark kept ``llm.runner.graphs`` for its capture count): drop
        # the model, pool and attention so such a handle cannot pin the closed engine's weights and KV pool.
        self.model = self.pool = self.attention = None

    @property
    def slot_mapping(self) -> torch.Tensor:
        """``[G, max_batch]`` long: the slot mapping the graphs read (padding columns hold the scratch slot)."""
        return self.inputs.slot_mapping

    def can_run(self, batch: int) -> bool:
        return batch <= self.buckets[-1]

    def bucket(self, batch: int) -> int:
        """The batch size of the graph that runs ``batch`` rows (the smallest bucket ``>= batch``)."""
        return next(size for size in self.buckets if size >= batch)

    def run(self, batch: int, slots: torch.Tensor, width: int) -> torch.Tensor:
        """Replay the decode step of ``batch`` rows whose inputs are staged in ``self.inputs`` (padded to
        :meth:`bucket`); ``slots``: ``[G, batch]`` the new tokens' slots; ``width``: the longest row's slot count.

        Returns:
            ``[batch, V]`` float32 logits: a view of the shared output buffer, valid until the next replay."""
        b = self.bucket(batch)
        w = width_bucket(width, self.pool.max_len)
        self.inputs.set_slots(slots, b)
        if (b, w) not in self.graphs:
            self._capture(b, w)
        self.graphs[(b, w)].replay()
        return self.logits[:batch]


@torch.inference_mode()
def profile_peak_bytes(model, cfg, max_model_len: int, dtype: torch.dtype, device: torch.device) -> int:
    """Peak CUDA bytes of the weights plus one full prefill step (``max_num_batched_tokens`` tokens in chunks of
    ``chunk_prefill_size``), plus the extra a chunk needs to attend to ``max_model_len`` earlier tokens (its
    gathered K/V, and head-repeated K/V in case SDPA lacks GQA; only the gathered K/V under the ``"auto"`` prefill
    route), estimated from shapes."""
    from .attention import PoolAttention, Segment, default_prefill_route
    from .kv_pool import KVPool

    chunk = cfg.chunk_prefill_size
    n_chunks = max(1, cfg.max_num_batched_tokens // chunk)
    T = n_chunks * chunk
    pool = KVPool(model.num_layers, model.num_kv_heads, model.head_dim, T, n_chunks, chunk, False, dtype, device)
    attention = PoolAttention(pool)
    model.set_backend(attention)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    slot_mapping = pool.allocate(list(range(n_chunks)), [chunk] * n_chunks)
    attention.ctx = StepContext(slot_mapping, [Segment(r, r * chunk, chunk, chunk) for r in range(n_chunks)])
    ids = torch.zeros(T, dtype=torch.long, device=device)
    hidden = model(ids, torch.arange(T, device=device) % min(chunk, max_model_len))   # within the RoPE table
    model.logits(hidden[-n_chunks:])
    attention.ctx = None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - sum(t.numel() * t.element_size() for t in pool.k + pool.v)
    del pool, attention, hidden
    torch.cuda.empty_cache()
    elt = torch.tensor([], dtype=dtype).element_size()
    H, Hkv, D = model.num_heads, model.num_kv_heads, model.head_dim
    # Under the "auto" route (Triton, bf16/fp16) a chunk reads the context in place (paged kernel) or gathers only its
    # earlier K/V (the split cuDNN route); under "gather" (the CPU, and fp32 on CUDA: FP32_PREFILL_ROUTE) SDPA gathers
    # K/V and may repeat them per query head.
    in_place = default_prefill_route(torch.empty(0, dtype=dtype, device=device)) == "auto"
    context_extra = max_model_len * D * elt * 2 * (Hkv if in_place else H + Hkv)
    return int(peak + context_extra)
