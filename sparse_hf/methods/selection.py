"""Selection helpers shared by every method (HF path and engine).

All functions are plain tensor code: no Hugging Face classes. Shapes use
``B`` batch rows, ``Hkv`` KV heads, ``L`` cache slots.
"""

from __future__ import annotations

import torch


def sink_recent_candidates(valid: torch.Tensor, num_sink: int, num_recent: int):
    """Split the valid slots of each row into sink, recent and middle candidates.

    Slots must be in increasing logical-position order along the last axis (invalid slots may be anywhere).

    Args:
        valid: ``[B, Hkv, L]`` bool, which slots hold a real token.
        num_sink: the first ``num_sink`` valid tokens of each row are sinks.
        num_recent: the last ``num_recent`` valid tokens of each row are recent (an int, or a tensor that
            broadcasts against ``[B, Hkv, 1]`` for a count per row).

    Returns:
        ``(is_sink, is_recent, is_candidate)``, each ``[B, Hkv, L]`` bool, disjoint.
    """
    n_valid = valid.sum(-1, keepdim=True)
    rank = valid.long().cumsum(-1) - 1
    is_sink = valid & (rank < num_sink)
    is_recent = valid & ~is_sink & (rank >= n_valid - num_recent)
    is_candidate = valid & ~is_sink & ~is_recent
    return is_sink, is_recent, is_candidate


def canonical_priorities(prio: torch.Tensor) -> torch.Tensor:
    """``prio`` with ``-0.0`` replaced by ``+0.0`` and every NaN by one positive NaN (same shape and dtype).

    The CPU sort already treats ``-0.0 == +0.0`` and all NaNs as equal (and above ``inf``); CUDA's sort orders by
    the bits (``-0.0 < +0.0``, a negative NaN below ``-inf``), so without this the tie rule would depend on the
    device (measured on an H200: the top-1 of tied scores with signed NaNs differed from the CPU's)."""
    prio = torch.where(prio == 0, torch.zeros_like(prio), prio)
    return torch.where(torch.isnan(prio), torch.full_like(prio, float("nan")), prio)


def priority_order(prio: torch.Tensor) -> torch.Tensor:
    """Slot indices ``[..., L]`` by decreasing ``prio``; equal priorities in slot order (the reference rule).

    Slots are in logical order and padding slots never tie with real ones (they are ``-inf``), so a tie goes to
    the token that comes first in its row: a rule independent of left padding (``topk`` breaks ties by where
    the slot lies in the buffer, which padding shifts), so a prompt keeps the same tokens alone or batched.
    ``-0.0`` ties with ``+0.0``; NaNs tie with each other and rank above ``inf``, on every device. A full stable
    sort: the selection paths call :func:`top_priority`, which returns its first ``k`` columns.
    """
    return canonical_priorities(prio).sort(dim=-1, descending=True, stable=True).indices


#: Float dtypes whose values fit float32 exactly, so :func:`priority_keys` can encode them in 32 bits.
_KEYED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def priority_keys(prio: torch.Tensor) -> torch.Tensor:
    """One int64 per slot that orders like ``(prio, -slot)``: ``[..., L]`` float -> ``[..., L]`` int64, all distinct.

    The high 32 bits are ``prio`` as float32 (after :func:`canonical_priorities`) mapped to an order-preserving
    int32 (non-negative floats keep their bits, negative ones get their magnitude bits flipped, so
    ``-inf < ... < 0 < ... < inf < NaN``); the low 32 bits are ``L - 1 - slot``, so among equal priorities the
    earlier slot has the larger key: exactly the order of :func:`priority_order`. ``prio`` must be float32,
    bfloat16 or float16 (exact in float32).
    """
    if prio.dtype not in _KEYED_DTYPES:
        raise TypeError(f"priority_keys takes float32, bfloat16 or float16 priorities, got {prio.dtype} "
                        "(float64 does not fit 32 bits exactly; use priority_order)")
    L = prio.shape[-1]
    if L > 2**32:
        raise ValueError(f"priority_keys packs slot indices in 32 bits; {L} slots is too many")
    tiebreak = torch.arange(L - 1, -1, -1, device=prio.device, dtype=torch.long)
    return ordered_priorities(prio) * 2**32 + tiebreak


def ordered_priorities(prio: torch.Tensor) -> torch.Tensor:
    """``prio`` (float32, bfloat16 or float16) as int64 values in ``[-2**31, 2**31)`` that order exactly like the
    priorities after :func:`canonical_priorities` (``-inf < ... < 0 < ... < inf < NaN``, ``-0.0 == +0.0``): the
    float32 bits, negative floats with their magnitude bits flipped. Same shape."""
    bits = canonical_priorities(prio.float()).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()            # int32 order == float order


def lowest_candidate(scores: torch.Tensor, order: torch.Tensor, candidate: torch.Tensor):
    """The candidate that :func:`select_keep` drops when it must drop exactly one: the lowest score, and among
    equal scores the one that comes last (largest ``order``); ties, ``-0.0``/``+0.0`` and NaNs as in
    :func:`priority_order`. One ``argmin`` over int64 keys (score, then ``-order``), no sort.

    Args:
        scores: ``[..., L]`` float32/bfloat16/float16.
        order: ``[..., L]`` integers in ``[0, 2**31)``, the tokens' logical order (distinct among a row's candidates;
            slot indices when slots are in logical order, positions otherwise).
        candidate: ``[..., L]`` bool.

    Returns:
        ``(idx, found)``: ``[...]`` long, the index along ``L`` of the dropped candidate, and ``[...]`` bool, whether
        the row had a candidate at all (``idx`` is meaningless where not).
    """
    if scores.dtype not in _KEYED_DTYPES:
        raise TypeError(f"lowest_candidate takes float32, bfloat16 or float16 scores, got {scores.dtype}")
    key = ordered_priorities(scores) * 2**32 + (2**31 - 1 - order.long())
    key = torch.where(candidate, key, torch.iinfo(torch.long).max)
    return key.argmin(-1), candidate.any(-1)


def top_priority(prio: torch.Tensor, k: int) -> torch.Tensor:
    """``priority_order(prio)[..., :k]``: the ``min(k, L)`` slots of highest priority, ``[..., L]`` -> ``[..., k]``.

    Two implementations with the same result (set and order), each where it is the faster one (measured with
    ``benchmarks/bench_selection_topk.py`` at 28 heads x 4K-131K candidates, 10% kept): on CUDA the stable sort
    (0.24-0.36 ms at 131072 on an H200, against 0.66-0.71 ms for a ``topk`` over int64 keys); elsewhere a ``topk``
    over :func:`priority_keys`, which are distinct, so ``topk``'s own tie rule never matters (1.6-6x faster than
    the sort on CPU). float64 priorities always take the sort (they do not fit the 32-bit key).
    """
    k = min(int(k), prio.shape[-1])
    if prio.is_cuda or prio.dtype not in _KEYED_DTYPES:
        return priority_order(prio)[..., :k]
    return priority_keys(prio).topk(k, dim=-1, largest=True, sorted=True).indices


def select_keep(valid: torch.Tensor, scores: torch.Tensor | None, num_sink: int, num_recent: int,
                num_top: torch.Tensor | int):
    """Choose the slots to keep: sink + top-``num_top`` middle candidates by ``scores`` + recent.

    Args:
        valid: ``[B, Hkv, L]`` bool.
        scores: ``[B, Hkv, L]`` float, higher is more important (only candidate entries are read);
            ``None`` means no middle tokens are kept (StreamingLLM).
        num_sink, num_recent: protected token counts per row (``num_recent`` may be per row, see
            :func:`sink_recent_candidates`).
        num_top: int or ``[B]`` long, middle tokens to keep per row (capped at the candidates there are).

    Returns:
        ``idx``: ``[B, Hkv, K]`` long slot indices in increasing slot order, and ``ok``: ``[B, Hkv, K]`` bool
        (``False`` marks filler entries of rows that keep fewer than ``K`` tokens; they come last).
    """
    B, Hkv, L = valid.shape
    is_sink, is_recent, is_cand = sink_recent_candidates(valid, num_sink, num_recent)
    protected = is_sink | is_recent
    if not torch.is_tensor(num_top):
        num_top = torch.full((B,), int(num_top), dtype=torch.long, device=valid.device)
    top = torch.minimum(num_top.to(valid.device).view(B, 1), is_cand.sum(-1))
    if scores is None:
        top = torch.zeros_like(top)
        scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    budget = protected.sum(-1) + top                                           # [B, Hkv]
    K = int(budget.max())
    prio = torch.where(is_cand, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    prio = torch.where(protected, torch.full_like(prio, float("inf")), prio)
    idx = top_priority(prio, K)                                                # [B, Hkv, K], priority order
    ok = torch.arange(K, device=valid.device).view(1, 1, K) < budget.unsqueeze(-1)
    order_key = torch.where(ok, idx, idx + L)                                  # fillers sort last
    order = order_key.argsort(dim=-1)
    return idx.gather(-1, order), ok.gather(-1, order)


def select_keep_static(valid: torch.Tensor, scores: torch.Tensor, num_sink: int, num_recent: int,
                       num_top: torch.Tensor | int, k: int):
    """:func:`select_keep` with a fixed output size and no host-device sync (decode path, CUDA graphs).

    Args:
        valid, scores, num_sink, num_recent: as in :func:`select_keep` (``[B, Hkv, L]``).
        num_top: int or ``[B]`` long, middle tokens per row.
        k: output size; rows that keep fewer tokens get ``ok == False`` fillers.

    Returns:
        ``(idx, ok)`` each ``[B, Hkv, k]`` in priority order (not slot order: index-reading kernels do not care).
    """
    B, Hkv, L = valid.shape
    is_sink, is_recent, is_cand = sink_recent_candidates(valid, num_sink, num_recent)
    protected = is_sink | is_recent
    prio = torch.where(is_cand, scores.float(), float("-inf"))
    prio = torch.where(protected, float("inf"), prio)
    idx = top_priority(prio, k)
    vals = prio.gather(-1, idx)
    if torch.is_tensor(num_top):
        num_top = num_top.view(B, 1, 1)
    rank = torch.arange(idx.shape[-1], device=valid.device).view(1, 1, -1)
    limit = protected.sum(-1, keepdim=True) + num_top
    ok = (vals > float("-inf")) & ((vals == float("inf")) | (rank < limit))
    return idx, ok


def max_pool_scores(scores: torch.Tensor, kernel_size: int, present: torch.Tensor | None = None) -> torch.Tensor:
    """Max-pool ``[..., L]`` scores along ``L`` with stride 1 and same padding, so that neighbours of an
    important token are kept with it (SnapKV's clustering step).

    ``present``: ``[..., L]`` bool (broadcast against ``scores``), the slots that hold tokens to pool over, in
    logical order along ``L``. Neighbours are then the next present tokens, whatever empty slots lie between them
    (a batched cache's row can hold holes: a second turn appends after the slots its first turn kept, which other
    rows' evictions leave at other places), so a row pools alike alone or in any batch. The values left in the
    other slots are unspecified (callers mask them). ``None``: every slot is present."""
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    if present is not None:
        present = present.expand(shape)
        order = (~present).to(torch.int8).argsort(dim=-1, stable=True)     # present slots first, in slot order
        packed = scores.gather(-1, order).masked_fill(~present.gather(-1, order), float("-inf"))
        return torch.empty_like(scores).scatter_(-1, order, max_pool_scores(packed, kernel_size))
    flat = scores.reshape(-1, 1, shape[-1])
    pooled = torch.nn.functional.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.reshape(shape)


#: How far one token selection reaches (the ``selection_scope`` knob of snapkv, pyramidkv and knorm):
#: ``"kv_head"`` each KV head keeps its own tokens; ``"layer"`` one set of tokens for every KV head of the layer
#: (the reference SnapKV/PyramidKV: ``output_2d=True`` and the engine's prefill eviction).
SELECTION_SCOPES = ("kv_head", "layer")


def check_selection_scope(name: str, value) -> str:
    """The ``selection_scope`` knob: one of :data:`SELECTION_SCOPES`."""
    if value not in SELECTION_SCOPES:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, SELECTION_SCOPES))} "
                         "('kv_head': each KV head keeps its own tokens; 'layer': one selection for the whole layer)")
    return value


def select_keep_shared(valid: torch.Tensor, scores: torch.Tensor, num_sink: int, num_recent: int,
                       num_top: torch.Tensor | int):
    """:func:`select_keep` with one selection per row shared by every KV head (``selection_scope="layer"``).

    Args:
        valid: ``[B, Hkv, L]`` bool; every KV head of a row must hold the same slots (true after a prompt).
        scores: ``[B, 1, L]`` one score per slot for the whole layer.
        num_sink, num_recent, num_top: as in :func:`select_keep`.

    Returns:
        ``(idx, ok)`` each ``[B, Hkv, K]``, the same for every KV head (an expanded view).
    """
    B, Hkv, L = valid.shape
    if scores.shape != (B, 1, L):
        raise ValueError(f"layer-scope scores must be [B, 1, L] = {(B, 1, L)}, got {tuple(scores.shape)}")
    if Hkv > 1 and not bool((valid == valid[:, :1]).all()):
        raise ValueError("selection_scope='layer' needs every KV head of a row to hold the same slots; "
                         "use selection_scope='kv_head' for caches whose heads differ")
    idx, ok = select_keep(valid[:, :1], scores, num_sink, num_recent, num_top)
    return idx.expand(B, Hkv, idx.shape[-1]), ok.expand(B, Hkv, ok.shape[-1])
