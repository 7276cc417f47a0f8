"""DeltaKV's compression on the HF path: each compressed layer's flush of its rows' oldest raw-buffer tokens into
the core's :class:`~sparse_hf.deltakv.state.CompressedState` (at the prompt's end and every ``num_recent_tokens``
decode steps per row), as a mixin of :class:`~sparse_hf.hf.deltakv_cache.CompressedCache`.

The compressed layers flush the same tokens at the same steps, so one :class:`_FlushPlan` (which slots, their
positions, the inverse RoPE's tables, what the raw buffer keeps) is made by the first layer of a forward and reused by
the others. No host-device sync, except one read of the padding per padded prompt.
"""

from __future__ import annotations

import dataclasses

import torch

from ..deltakv.flush_rows import host_ints
from ..deltakv.rope import unrotate
from ..deltakv.state import CompressedState, flush


@dataclasses.dataclass
class _FlushPlan:
    """One flush step's index work, shared by the compressed layers (:meth:`CompressedCache._flush_plan`): raw
    ``slots`` and their positions ``pos`` ``[B, m]``, ``keep`` (``[B, K]`` slots and validity) for ``keep_raw``, the
    inverse RoPE's ``cos_sin`` (made by the first layer that needs them) and the core's ``rows``."""

    key: tuple
    slots: torch.Tensor
    pos: torch.Tensor
    keep: tuple
    cos_sin: tuple | None = None
    rows: object = None


class PromptFlush:
    """The flush methods of :class:`~sparse_hf.hf.deltakv_cache.CompressedCache` (its ``clustering``, ``method``,
    ``projections``, ``planned_length`` and plan/padding memos)."""

    @staticmethod
    def _raw_x(module, layer, slots: torch.Tensor, pos: torch.Tensor, plan=None) -> torch.Tensor:
        """``x = concat(K, V)`` before RoPE (and k_norm) of raw slots ``slots [B, m]`` at RoPE positions ``pos [B, m]``
        (``layer.raw_pos`` there): ``[B, m, Dx]``. ``plan`` (a :class:`_FlushPlan`) keeps the inverse RoPE's
        tables for the next layer."""
        B, m = slots.shape
        _, Hkv, _, D = layer.keys.shape
        at = slots.view(B, 1, m, 1)
        v = layer.values.gather(2, at.expand(B, Hkv, m, layer.values.shape[-1])).transpose(1, 2).reshape(B, m, -1)
        if layer.raw_kpre is not None:
            k = layer.raw_kpre.gather(1, slots.unsqueeze(-1).expand(B, m, layer.raw_kpre.shape[-1]))
        else:
            post = layer.keys.gather(2, at.expand(B, Hkv, m, D)).float()
            if plan is None or plan.cos_sin is None:
                cos, sin = module.__dict__["_sparse_hf_rotary"](post, pos)
                cos_sin = (cos.float(), sin.float())
                if plan is not None:
                    plan.cos_sin = cos_sin
            k = unrotate(post, *(plan.cos_sin if plan is not None else cos_sin)).transpose(1, 2).reshape(B, m, -1)
        return torch.cat([k.to(layer.values.dtype), v], -1)

    def _flush_counts(self, layer, seen: int) -> tuple[list[int], list[int]]:
        """Host lists ``[B]`` (not to be changed: they may be shared): each row's raw tokens at logical length
        ``seen``, and how many of them to compress. The compressed layers hold the same rows (padding, compressed
        counts) at the same length, so the last answer is given again while ``seen``, ``layer.pad`` and the state's
        counts equal (by value) those it was made for: a replayed step's maintenance asks once per layer (24 at
        Qwen2.5-7B's shape) and flushes at most every ``num_recent_tokens`` steps."""
        pad, held = layer.pad, layer.state.counts
        memo = self._counts_memo
        if memo is not None and memo[0] == seen and memo[1] == pad and memo[2] == held:
            return memo[3]
        S = self.clustering.num_sink
        raw = [seen - p - n for p, n in zip(pad, held)]
        answer = raw, [self.method.flush_count(max(0, n - S)) for n in raw]
        self._counts_memo = (seen, list(pad), list(held), answer)
        return answer

    def _padding(self, layer, attention_mask) -> list[int]:
        """Host list ``[B]``: each row's padding columns at the prompt's end. No read from the device when no mask
        ever marked a slot of the layer empty (then there is none); otherwise one read per prompt, shared by the
        compressed layers (they saw the same masks: keyed by this forward's mask object and the length)."""
        B = layer.keys.shape[0]
        if not layer.masked:
            return [0] * B
        memo = self._pad_memo
        if attention_mask is not None and memo is not None and memo[0] is attention_mask and memo[1] == layer.seen:
            return list(memo[2])
        pad = (layer.positions[:, 0] < 0).sum(-1).tolist()                # the one sync of a padded prompt
        self._pad_memo = (attention_mask, layer.seen, pad) if attention_mask is not None else None
        return list(pad)

    def _flush_plan(self, module, layer, raw: list[int], counts: list[int]) -> "_FlushPlan":
        """The index work of ``layer``'s flush of ``counts`` tokens per row (``raw``: its raw tokens per row): which
        raw slots to compress and their positions, the RoPE tables that undo their rotation, the slots the raw
        buffer keeps, and the core's :class:`~sparse_hf.deltakv.flush_rows.FlushRows`. The compressed layers flush
        the same tokens at the same steps (same lengths, counts, padding and slot order), so the first layer of a
        forward (or of a replayed step's flushes) makes it and the others reuse it, keyed by those host values."""
        B, n = layer.keys.shape[0], layer.num_slots
        S = self.clustering.num_sink
        rope = module.__dict__.get("_sparse_hf_rotary")
        key = (self._forward, layer.seen, n, tuple(layer.pad), tuple(layer.state.counts), tuple(counts),
               layer.masked, layer.compacted, layer.state.capacity, id(rope), layer.raw_kpre is None,
               layer.keys.device)                  # layers on other devices (device_map) make their own
        if self._plan is not None and self._plan.key == key:
            return self._plan
        dev = layer.keys.device
        ar = torch.arange(n, device=dev)
        if layer.masked or layer.compacted:
            valid = layer.positions[:, 0] >= 0                             # [B, n]
            order = torch.where(valid, ar, ar + n).argsort(-1)             # [B, n] slot of each row's rank
        else:                                  # every slot live, in column order: the ranks are the slots
            order = ar.expand(B, n)
        lo = 0 if layer.state.needs_sinks(counts) else S
        slots = order[:, lo:S + max(counts)]
        # Keep each row's sinks (ranks < S) and the rest of its buffer (ranks >= S + count); fillers last.
        left = [r - c for r, c in zip(raw, counts)]
        K = max(left)
        rank = torch.arange(K, device=dev).view(1, K)
        flushed, kept = host_ints([counts, left], dev).view(2, B, 1)      # one upload, no sync
        keep = (order.gather(1, torch.where(rank < S, rank, rank + flushed).clamp(max=n - 1)), rank < kept)
        self._plan = _FlushPlan(key, slots, layer.raw_pos.gather(1, slots), keep)
        return self._plan

    def _flush(self, module, layer, attention_mask=None) -> None:
        """Compress each row's oldest raw-buffer tokens once its buffer holds twice ``num_recent_tokens``. No
        host-device sync, except one read of the padding per padded prompt (:meth:`_padding`)."""
        B = layer.keys.shape[0]
        S = self.clustering.num_sink
        if layer.state is None:                        # the prompt is complete: padding is known
            layer.state = CompressedState(B, self.clustering)
            layer.pad = self._padding(layer, attention_mask)
            layer.col_offset = ((layer.positions[:, 0] < 0).sum(-1, keepdim=True) if layer.masked
                                else torch.zeros(B, 1, dtype=torch.long, device=layer.keys.device))
            if self.planned_length is not None:
                self._reserve_state(layer)
        state = layer.state
        raw, counts = self._flush_counts(layer, layer.seen)
        if not any(counts):
            return
        plan = self._flush_plan(module, layer, raw, counts)
        x = self._raw_x(module, layer, plan.slots, plan.pos, plan)
        lo = 0 if state.needs_sinks(counts) else S
        sinks = (x[:, :S], plan.pos[:, :S]) if lo == 0 else None
        plan.rows = flush(state, x[:, S - lo:], plan.pos[:, S - lo:], counts, self.projections, module.layer_idx,
                          sinks, rows=plan.rows)
        layer.set_columns()
        layer.keep_raw(*plan.keep)                                         # [B, K]
        if layer.frozen:   # size the scratch for the steps up to the next flush now: one re-capture, not two
            if state.capacity and self.planned_length is not None:
                layer.set_scratch(self._scratch_width(layer, layer.seen))     # planned: the same width throughout
            else:
                layer.set_scratch(min(state.width, self.method.top_count(
                    layer.seen + self.sparse_config.num_recent_tokens, prefill=False)))
            layer.reserve_work()
