"""What a generation's cache really kept and read, for the "equal budgets" columns of the eval tables.

A budget means the tokens each sparse layer reads at a decode step (sinks and recent tokens included). The tables
report, beside the budget, what the cache shows after the generation (so at its last decode step):

* ``kept``: tokens a sparse layer holds (:func:`sparse_hf.kv_usage`; DeltaKV: raw + compressed tokens);
* ``read``: tokens a sparse layer's attention reads: what it holds for eviction methods; the observer layer's
  selection for OmniKV; the raw slots plus the compressed tokens the method picks to rebuild for DeltaKV;
* ``full_layer_share``: the share of layers that read everything by the method's layer layout (OmniKV/DeltaKV
  filter layers, SnapKV's ``snapkv_num_full_layers``; 1.0 for the full cache).

Means are over the sparse layers and the batch rows. Nothing here is a hand-written number: every count comes
from the cache's tensors and the method's own hooks.
"""

from __future__ import annotations

import torch


def full_layer_flags(cache, num_layers: int) -> list[bool]:
    """Per layer, whether the method makes it read everything (no method, e.g. a ``DynamicCache``: all)."""
    return method_full_layer_flags(getattr(cache, "method", None), num_layers)


def method_full_layer_flags(method, num_layers: int) -> list[bool]:
    """Per layer, whether ``method`` (a core method object, or ``None`` for the full cache) reads everything."""
    if method is None:
        return [True] * num_layers
    if hasattr(method, "is_full"):
        return [bool(method.is_full(i)) for i in range(num_layers)]
    first_sparse = getattr(method.config, "snapkv_num_full_layers", 0)
    return [i < first_sparse for i in range(num_layers)]


def _deltakv_reads(cache, layer) -> list[int]:
    """Per row: raw slots + compressed tokens :meth:`DeltaKV.pick` rebuilds at a decode step of this length."""
    raw = (layer.positions[:, 0] >= 0).sum(-1).tolist()
    counts = layer.compressed_per_row()
    if not any(counts):
        return raw
    n = max(counts)
    present = torch.arange(n).view(1, n) < torch.tensor(counts).view(-1, 1)           # [B, N]
    scores = torch.where(present, 0.0, float("-inf"))
    pick = cache.method.pick(scores, n, layer.seen)
    if pick is None:
        return [r + c for r, c in zip(raw, counts)]
    picked = present.gather(1, pick)                                                    # [B, k]: real offsets
    padding = layer.col_offset[:, 0].cpu() if layer.col_offset is not None else torch.zeros(len(raw), dtype=torch.long)
    over = cache.method.over_row_budget(padding, layer.seen)
    if over is not None:
        picked &= ~over
    return [r + int(p) for r, p in zip(raw, picked.sum(-1).tolist())]


def layer_reads(cache, kept: list[list[int]]) -> list[list[int]]:
    """Per layer, per row, the tokens its attention reads at the cache's last decode step."""
    method = getattr(cache, "method", None)
    family = getattr(method, "family", None)
    out = []
    selection = getattr(cache, "selection", None)
    for i, layer in enumerate(cache.layers):
        if family == "mask" and not method.is_full(i) and selection is not None:
            out.append(selection[1].sum(-1).tolist())
        elif family == "compress" and not method.is_full(i) and hasattr(layer, "compressed_per_row"):
            out.append(_deltakv_reads(cache, layer))
        else:
            out.append(list(kept[i]))
    return out


def budget_use(cache) -> dict:
    """``{"kept", "read", "full_layer_share", "context_tokens"}`` of ``cache`` after a generation.

    ``kept`` / ``read``: mean over sparse layers (every layer when all read everything) and rows; ``context_tokens``:
    the cache's logical length (prompt + generated tokens fed back so far)."""
    from ..usage import kv_usage

    usage = kv_usage(cache)
    num_layers = len(usage.kept_tokens)
    full = full_layer_flags(cache, num_layers)
    reads = layer_reads(cache, usage.kept_tokens)
    sparse = [i for i in range(num_layers) if not full[i]] or list(range(num_layers))

    def mean(per_layer):
        values = [v for i in sparse for v in per_layer[i]]
        return sum(values) / len(values) if values else float("nan")

    return {"kept": mean(usage.kept_tokens), "read": mean(reads), "full_layer_share": sum(full) / max(1, num_layers),
            "context_tokens": usage.logical_tokens}


def _mask_reads(method, length: int) -> int:
    """Tokens a sparse layer of a selection method (OmniKV) reads at a decode step over ``length`` tokens: all of
    them when sinks, recent tokens and the top-k cover the context (``select_decode`` then selects nothing), else
    exactly sinks + recent + top-k (the engine does not report its selections; the HF-path test checks this count
    against the cache's measured selection)."""
    c = method.config
    chosen = c.num_sink_tokens + c.num_recent_tokens + method.top_count(length, prefill=False)
    return length if chosen >= length else chosen


def engine_budget_use(method, num_layers: int, kept_all_layers: int, context_tokens: int) -> dict:
    """The :func:`budget_use` fields of one engine request, from what the engine reports when it ends:
    ``kept_all_layers`` (``RequestOutput.metrics["kept_kv_tokens"]``: slots held summed over layers, DeltaKV's
    compressed tokens included) and ``context_tokens`` (prompt + generated tokens whose K/V were written).

    A full layer holds the whole context, so the sparse layers' mean is what remains after them. ``read`` is
    what a layer holds for eviction methods and the full cache, OmniKV's selection size for OmniKV
    (:func:`_mask_reads`); DeltaKV's decode-time picks are not reported by the engine, so its ``read`` is ``None``
    (shown as ``-``)."""
    full = method_full_layer_flags(method, num_layers)
    sparse = num_layers - sum(full)
    if sparse == 0:
        kept = float(context_tokens)
    else:
        kept = max(0.0, (kept_all_layers - sum(full) * context_tokens) / sparse)
    family = getattr(method, "family", None)
    read = kept if family in (None, "evict") or sparse == 0 else None
    if family == "mask" and sparse and hasattr(method, "top_count"):
        read = float(_mask_reads(method, context_tokens))
    return {"kept": kept, "read": read, "full_layer_share": sum(full) / max(1, num_layers),
            "context_tokens": context_tokens}
