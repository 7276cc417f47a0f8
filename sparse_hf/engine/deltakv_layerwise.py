"""Layer-major ("layer-wise") prefill of one DeltaKV prompt: longer prompts than the chunked prefill can hold.

Chunked prefill runs every layer on each chunk, so a prompt stays raw in every layer until it ends and the
compressed layers' slot group must hold it whole. Here one prompt runs as a step of its own, layer by layer: for
layer ``l = 0 .. L-1``, for each chunk of ``chunk`` tokens, decoder layer ``l`` runs on the chunk's hidden states
with causal attention over a dense staging K/V of the prompt (``[n, Hkv, D]`` each, one layer's worth, reused by
every layer). After a layer's last chunk:

- a filter layer stores every token in the row's group-0 slots;
- a compressed layer compresses at once, with the engine's own flush (:meth:`DeltaKVRunner.compress_layer`, the
  core :func:`~sparse_hf.deltakv.state.flush` at the HF path's rule :meth:`DeltaKV.flush_count`, in blocks of
  :data:`~.deltakv_attention.FLUSH_BLOCK` tokens), and stores only what stays raw (sinks + the buffer the rule
  leaves) in the row's group-1 slots (Qwen3: with their pre-norm keys, which the staging keeps beside K/V: no
  inverse RoPE needed).

The output is the chunked prefill's: every token attends to the raw prompt before it in every layer (as on the HF
path), and the compressed state equals the one the chunked prefill's flush leaves after the prompt (same inputs, same
function). Only the order of the work differs (on CPU, at the same chunk size, the same attention floats).

Transient memory: the staging (2 or 3 x ``[n, Hkv, D]``) and the hidden states between layers (the residual stream
``[n, hidden]``), on the device or (``hidden_on_host``) in pinned host memory, streamed chunk by chunk (on CUDA
through a copy stream, so the next chunk's upload and the last one's download overlap the compute).
:func:`~.deltakv_store.layerwise_bytes_per_token` counts them; the memory split reserves them
(:func:`~.deltakv_store.split_slots`).

The step runs alone: decode rows wait during it, as during the reference engine's batch-1 long-prompt path.
Tensor parallelism: every rank runs the same step on its heads; a compressed layer's flush all-gathers the ranks'
``concat(K, V)`` columns as the chunked flush does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.sdpa_split import SplitUnavailable, split_chunk_attention
from .attention import chunk_attention

#: The pool group of the compressed layers (as in :mod:`.deltakv_attention`).
COMPRESSED = 1


@dataclass
class LayerwisePlan:
    """One prompt's layer-wise prefill: its ``row`` (empty), token ``ids`` (the prompt: after a preemption
    the generated tokens are replayed as decode steps), the ``chunk`` size, and where the hidden states live."""

    row: int
    ids: list
    chunk: int
    hidden_on_host: bool = False


def plan_layerwise(req, config) -> LayerwisePlan:
    """The plan of ``req``'s layer-wise prefill under engine knobs ``config``."""
    return LayerwisePlan(req.row, [req.token(p) for p in range(req.prefill_end)], config.chunk_prefill_size,
                         config.layerwise_hidden_on_host)


def kept_raw(method, n: int) -> int:
    """Raw tokens a prompt of ``n`` keeps in each compressed layer after its prefill (sinks + the buffer the flush
    rule leaves), as the chunked prefill's flush leaves them."""
    S = method.config.num_sink_tokens
    return n - method.flush_count(max(0, n - S))


class LayerwiseRoute:
    """Which prompts the scheduler runs layer-wise (``deltakv_prefill``), and the slots they take.

    ``"layerwise"``: every prompt; ``"auto"``: a prompt the chunked prefill cannot hold (it would need more raw slots
    in the compressed layers' group than the pool has) or longer than
    :data:`~.deltakv_store.AUTO_CHUNKED_TOKENS` (the room :func:`~.deltakv_store.split_slots` keeps for it)."""

    def __init__(self, mode: str, pool, method):
        from . import deltakv_store

        self.mode, self.method = mode, method
        self.compressed = pool.num_groups > 1
        #: The longest prompt that runs chunked.
        self.chunked_max = 0 if mode == "layerwise" else min(deltakv_store.AUTO_CHUNKED_TOKENS,
                                                             pool.group_slots[-1] - 1)

    def takes(self, n: int) -> bool:
        """Whether a prompt of ``n`` tokens runs layer-wise."""
        return n > self.chunked_max

    def slots(self, n: int) -> list[int]:
        """Slots per group a layer-wise prompt of ``n`` tokens holds after its step."""
        return [n, kept_raw(self.method, n)] if self.compressed else [n]


def layerwise_route(config, pool, method):
    """The :class:`LayerwiseRoute` of an engine (``None``: not DeltaKV, or ``deltakv_prefill="chunked"``)."""
    if method is None or method.name != "deltakv" or config.deltakv_prefill == "chunked":
        return None
    return LayerwiseRoute(config.deltakv_prefill, pool, method)


class StagingAttention:
    """The attention backend of a layer-wise pass: one layer's K/V of the whole prompt in a dense staging buffer.

    The model's fused RoPE kernel stores each chunk's K/V at its positions (:meth:`kv_destination`); Qwen3's
    pre-norm keys go beside them (:meth:`store_pre_norm_keys`); :meth:`attend` is causal attention of the chunk over
    the staging up to its end. ``k``, ``v``, ``pre``: ``[n, Hkv, D]`` (``pre`` only with pre-norm keys)."""

    def __init__(self, n: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 pre_norm_keys: bool):
        self.k = torch.empty(n, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pre = torch.empty_like(self.k) if pre_norm_keys else None
        self.split = device.type == "cuda"          # cuDNN's two-call route (kernels/sdpa_split.py) where it runs
        self.lo, self.hi, self.positions = 0, 0, None

    def set_chunk(self, lo: int, hi: int, positions: torch.Tensor) -> None:
        self.lo, self.hi, self.positions = lo, hi, positions

    def kv_destination(self, layer: int):
        return self.k, self.v, self.positions

    def store_pre_norm_keys(self, layer: int, k: torch.Tensor) -> None:
        if self.pre is not None:
            self.pre[self.lo:self.hi] = k.to(self.pre.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if self.split:
            try:
                return split_chunk_attention(q, self.k[:lo], self.v[:lo], self.k[lo:hi], self.v[lo:hi], scale)
            except SplitUnavailable:
                self.split = False
        return chunk_attention(q, self.k[:hi], self.v[:hi], scale)


class HiddenStates:
    """The residual stream of every prompt token between layers, ``h [n, hidden]`` (a layer's output ``x`` already
    added to its residual: what the next layer's fused add + RMSNorm would compute first, rounded the same way, so
    one tensor instead of two), on the device or in pinned host memory (``host``: a preallocated pinned buffer,
    reused across steps).

    :meth:`load` returns a chunk's states on the device, :meth:`save` writes them back. In host memory on CUDA the
    copies run on a side stream: :meth:`prefetch` starts a chunk's upload before the current chunk's compute, and a
    save's download waits only for its chunk's compute. Elsewhere the same calls are views and copies."""

    def __init__(self, n: int, hidden: int, dtype: torch.dtype, device: torch.device, host: torch.Tensor | None = None):
        self.device, self.on_host = device, host is not None
        self.h = host[:n] if self.on_host else torch.empty(n, hidden, dtype=dtype, device=device)
        self.stream = torch.cuda.Stream(device) if self.on_host and device.type == "cuda" else None
        self._ahead: dict[tuple[int, int], tuple] = {}            # (lo, hi) -> (states, event), uploading

    def prefetch(self, lo: int, hi: int) -> None:
        """Start uploading chunk ``[lo, hi)`` (host memory on CUDA; a no-op elsewhere)."""
        if self.stream is None or (lo, hi) in self._ahead:
            return
        with torch.cuda.stream(self.stream):
            h = self.h[lo:hi].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._ahead[(lo, hi)] = (h, done)

    def load(self, lo: int, hi: int) -> torch.Tensor:
        """Chunk ``[lo, hi)``'s states on the device (the caller may update them in place, then :meth:`save`)."""
        if self.stream is None:
            return self.h[lo:hi].to(self.device)                  # a view unless host memory on another device
        self.prefetch(lo, hi)
        h, done = self._ahead.pop((lo, hi))
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        h.record_stream(current)                  # allocated on the copy stream, used on this one
        return h

    def save(self, lo: int, hi: int, h: torch.Tensor) -> None:
        """Write chunk ``[lo, hi)``'s new states ``h`` back (nothing to do when ``h`` is the stored view)."""
        if self.stream is None:
            if h.data_ptr() != self.h[lo:hi].data_ptr():
                self.h[lo:hi].copy_(h)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))          # after the chunk's compute
        with torch.cuda.stream(self.stream):
            self.h[lo:hi].copy_(h, non_blocking=True)
        h.record_stream(self.stream)

    def finish(self) -> None:
        """Wait for the side stream's copies (before the pinned buffer is reused)."""
        if self.stream is not None:
            self.stream.synchronize()


def _upcoming(chunks: list, layer: int, c: int, num_layers: int):
    """The chunk after chunk ``c`` of ``layer`` whose hidden states are already saved (so it may be prefetched): the
    next chunk of this layer, or the first of the next layer once this layer's first chunk was saved (more than one
    chunk); ``None`` otherwise."""
    if c + 1 < len(chunks):
        return chunks[c + 1]
    return chunks[0] if len(chunks) > 1 and layer + 1 < num_layers else None


class LayerwisePrefill:
    """Runs :class:`LayerwisePlan` steps for a :class:`~.deltakv_attention.DeltaKVRunner` (its model, pool and
    flush); see the module docstring."""

    def __init__(self, runner):
        self.runner = runner
        self._host: torch.Tensor | None = None          # pinned hidden states (``hidden_on_host``), grown on demand

    def _host_buffer(self, n: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < n or self._host.dtype != dtype:
            self._host = None
            self._host = torch.empty(n, hidden, dtype=dtype, pin_memory=self.runner.device.type == "cuda")
        return self._host

    @torch.inference_mode()
    def run(self, plan: LayerwisePlan) -> torch.Tensor | None:
        """Prefill ``plan``'s prompt into its row. Returns ``[1, V]`` float32 logits at its last token (``None`` on a
        rank that computes no logits)."""
        runner = self.runner
        model, pool, method, device = runner.model, runner.pool, runner.method, runner.device
        n, row = len(plan.ids), plan.row
        S = method.config.num_sink_tokens
        compressed = pool.num_groups > 1
        count = method.flush_count(max(0, n - S)) if compressed else 0
        slots = pool.allocate_groups(row, [n, n - count] if compressed else [n])
        keep = torch.cat([torch.arange(min(S, n)), torch.arange(S + count, n)]).to(device) if count else None
        ids = torch.tensor(plan.ids, device=device)
        positions = torch.arange(n, device=device)
        stage = StagingAttention(n, pool.num_kv_heads, pool.head_dim, pool.k[0].dtype, device, bool(pool.pre_norm_k))
        size, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype
        states = HiddenStates(n, size, dtype, device,
                              self._host_buffer(n, size, dtype) if plan.hidden_on_host else None)
        chunks = [(lo, min(n, lo + plan.chunk)) for lo in range(0, n, plan.chunk)]
        model.set_backend(stage)
        try:
            for index, layer in enumerate(model.layers):
                for c, (lo, hi) in enumerate(chunks):
                    if index == 0:
                        h = model.embed_tokens(ids[lo:hi])
                    else:
                        h = states.load(lo, hi)
                        upcoming = _upcoming(chunks, index, c, len(model.layers))
                        if upcoming is not None:           # its upload overlaps this chunk's compute
                            states.prefetch(*upcoming)
                    stage.set_chunk(lo, hi, positions[lo:hi])
                    x, residual = layer(h, None, positions[lo:hi])     # residual is h, updated in place
                    states.save(lo, hi, residual.add_(x))
                self._store_layer(index, row, stage, slots, keep, count, positions)
            last = model.norm(states.load(n - 1, n))
        finally:
            states.finish()
            model.set_backend(runner.attention)
        if count:
            pool.store.version += 1
        return model.logits(last) if runner.compute_logits else None

    def _store_layer(self, layer: int, row: int, stage: StagingAttention, slots: list[torch.Tensor],
                     keep: torch.Tensor | None, count: int, positions: torch.Tensor) -> None:
        """After ``layer``'s last chunk: a filter layer stores every token at the row's group-0 slots; a compressed
        layer compresses its oldest ``count`` buffer tokens and stores the rest (sinks + buffer) at group-1 slots."""
        runner, pool = self.runner, self.runner.pool
        g = pool.group_of[layer]
        n = stage.k.shape[0]
        if g != COMPRESSED:
            pool.write(layer, slots[g], stage.k, stage.v)
            return
        pre = stage.pre
        keys = pre if pre is not None else stage.k

        def read(start, stop):        # the prompt's tokens start .. stop - 1 (table entry == position before a flush)
            return runner.compressor_input(keys[start:stop], stage.v[start:stop], positions[start:stop],
                                           pre_norm=pre is not None), positions[start:stop]

        runner.compress_in_blocks(row, layer, count, True, read)
        at = keep if keep is not None else slice(0, n)
        pool.write(layer, slots[g], stage.k[at], stage.v[at])
        if pre is not None:
            pool.pre_norm_k[layer][slots[g]] = pre[at]
