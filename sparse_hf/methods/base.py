"""The interfaces sparse methods implement, one per family.

A method owns its *policy*: how many tokens each layer keeps, how tokens are scored, and which are kept.
Caches (HF path) and the engine are thin adapters that call these hooks with plain tensors (no HF types).
Shapes: ``B`` batch rows, ``H`` query heads, ``Hkv`` KV heads (``G = H // Hkv``), ``L`` cache slots, ``D`` head
dim, ``W`` query-window length.

Every method also carries:
    * ``config_class``: its frozen config dataclass (defined in its file), built by :meth:`SparseMethod.build_config`;
    * :meth:`SparseMethod.knobs_for_budget`: the one rule turning a budget fraction into knobs (bench, eval, CLI).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import MethodConfig, RuntimeOptions, cache_config_dict, split_runtime_options


class SparseMethod:
    """Base class. Subclasses set ``name``, ``family`` and ``config_class`` and implement their family's hooks.

    Families:
        ``"evict"``: tokens are physically removed after the prompt (and possibly during decode):
            :class:`EvictionMethod`.
        ``"mask"``: every token stays in memory; sparse layers attend to a selected subset: :class:`SelectionMethod`.
        ``"compress"``: old tokens are stored compressed; selected ones are reconstructed: :class:`CompressionMethod`.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "evict"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None, num_layers: int):
        if config is None:
            config = self.config_class()
        if type(config) is not self.config_class:
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}; "
                            f"build one with {type(self).__name__}.build_config(knobs)")
        self.config = config
        self.num_layers = num_layers
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for configurations that cannot work with this method on ``num_layers`` layers."""

    # -- configuration -----------------------------------------------------------------------------------------
    @classmethod
    def build_config(cls, cache_config: Any = None, **knobs) -> tuple[MethodConfig, RuntimeOptions]:
        """``(method config, runtime options)`` from a ``cache_config`` (dict, ``SparseConfig``, this method's
        config object, or ``None``) and/or keyword knobs. Unused or unknown knobs raise ``ValueError`` naming
        this method's knobs."""
        if cache_config is not None and knobs:
            raise ValueError("pass either a cache config or keyword knobs, not both")
        if type(cache_config) is cls.config_class:
            return cache_config, RuntimeOptions()
        if isinstance(cache_config, MethodConfig):
            raise ValueError(f"{cls.name} needs a {cls.config_class.__name__}, got a "
                             f"{type(cache_config).__name__} (built for {cache_config.method_name!r})")
        method_knobs, runtime = split_runtime_options(cache_config_dict(cache_config) if knobs == {} else knobs)
        return cls.config_class.from_dict(method_knobs), runtime

    @classmethod
    def check_runtime(cls, runtime: RuntimeOptions) -> None:
        """Raise ``ValueError`` when ``runtime`` lacks something this method needs (e.g. DeltaKV's compressor)."""

    @classmethod
    def knobs_for_budget(cls, fraction: float, prompt_len: int) -> dict:
        """Knobs that make every sparse layer read about ``fraction * prompt_len`` tokens at a decode step,
        sinks and recent tokens included (the same budget means the same tokens read for every method).

        The shared split: 4 sinks, a recent window of a quarter of the budget (between 8 and 64 tokens), the rest
        as ``num_top_tokens`` (a count). Methods without scored tokens override this."""
        keep = budget_tokens(fraction, prompt_len)
        sink = min(4, keep)
        recent = min(keep - sink, min(64, max(8, keep // 4)))
        return dict(num_sink_tokens=sink, num_recent_tokens=recent, num_top_tokens=keep - sink - recent)


def budget_tokens(fraction: float, prompt_len: int) -> int:
    """Tokens a budget of ``fraction`` gives a ``prompt_len``-token prompt (at least 1)."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget {fraction!r}: expected a fraction in (0, 1]")
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len}: expected >= 1")
    return max(1, int(fraction * prompt_len))


class EvictionMethod(SparseMethod):
    """Physical eviction: a layer keeps a subset of its slots once the prompt is complete, and (if
    ``evicts_during_decode``) again during decode.

    Class attributes:
        evicts_during_decode: ``True`` if :meth:`decode_keep` may evict; ``False`` lets the cache skip decode-time
            work entirely (no per-step call, no host-device sync).
        accumulates_attention: ``True`` if the method scores tokens by the attention they receive over time
            (H2O): the cache then sums, per slot, the attention mass of every query (prompt and decode) with
            :meth:`accumulate` and hands it to :meth:`prefill_keep_scored` / :meth:`decode_keep`.
    """

    family = "evict"
    evicts_during_decode: ClassVar[bool] = False
    accumulates_attention: ClassVar[bool] = False

    @property
    def query_window(self) -> int:
        """How many of the last prompt queries :meth:`prefill_keep` needs (0: none)."""
        return 0

    def prefill_keep(self, layer_idx: int, keys: torch.Tensor, valid: torch.Tensor,
                     queries: torch.Tensor | None, query_valid: torch.Tensor | None, scaling: float,
                     reduce_heads=None):
        """Which slots to keep once the prompt is complete.

        Args:
            keys: ``[B, Hkv, L, D]`` post-RoPE keys of the whole prompt.
            valid: ``[B, Hkv, L]`` bool, real (non-padding) slots.
            queries: ``[B, H, W, D]`` the last ``query_window`` prompt queries, or ``None``.
            query_valid: ``[B, W]`` bool, which of those queries are real tokens.
            scaling: the attention softmax scale.
            reduce_heads: ``None``, or (tensor parallelism, where ``keys``/``queries`` hold only this rank's
                heads) ``reduce_heads(x, op)`` with ``op`` ``"max"`` or ``"mean"``: combines a per-rank reduction
                over heads into the one over every head of the layer (what one rank holding all heads would
                compute). Only selections shared by the heads of a layer (``selection_scope="layer"``) use it;
                per-KV-head selections are exact on their own.

        Returns:
            ``(idx, ok)`` from :func:`~sparse_hf.methods.selection.select_keep` (``[B, Hkv, K]`` slot indices in
            slot order, and which entries are real), or ``None`` to keep everything.
        """
        return None

    def decode_keep(self, layer_idx: int, valid: torch.Tensor, scores: torch.Tensor | None = None,
                    row_budget: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """Which slots to keep after a decode step, or ``None`` to keep all. Only called when
        ``evicts_during_decode``.

        Args:
            valid: ``[B, Hkv, L]`` bool, live slots.
            scores: ``[B, Hkv, L]`` float32 accumulated attention mass (``accumulates_attention`` methods only).
            row_budget: ``[B]`` long, slots each row may hold (from :meth:`row_budget`; accumulating methods).
            positions: ``[B, Hkv, L]`` the slots' logical positions (accumulating methods).

        Returns:
            ``(idx, ok)`` as in :meth:`prefill_keep`."""
        return None

    # -- accumulated attention (H2O-style methods) ----------------------------------------------------------------
    def accumulate(self, queries: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                   query_pos: torch.Tensor, query_valid: torch.Tensor | None, scaling: float, *,
                   backend: str = "auto", slots: torch.Tensor | None = None,
                   lse: torch.Tensor | None = None) -> torch.Tensor:
        """Attention mass that ``q`` new queries give the slots, to add to the running scores.

        Args:
            queries: ``[B, H, q, D]``; keys: ``[B, Hkv, L, D]`` post-RoPE.
            key_pos: ``[B, Hkv, L]`` long logical column of each slot; key_valid: ``[B, Hkv, L]`` bool real slots.
            query_pos: ``[q]`` long logical column of each query (causality: a query sees columns <= its own).
            query_valid: ``[B, q]`` bool or ``None`` (all real).
            scaling: softmax scale.
            backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (the kernel backend rules of ``sparse_hf.kernels``).
            slots: optional ``[B, L]`` slot table: ``keys`` is then a slot pool ``[B, Hkv, S, D]`` read in place.
            lse: optional ``[B, H, q]`` float natural-log log-sum-exp of each query over the keys it may see, as
                its attention computed it (then the softmax is not recomputed); invalid queries' entries unused.

        Returns:
            ``[B, Hkv, L]`` float32 (float64 for float64 inputs)."""
        raise NotImplementedError(f"{self.name} does not accumulate attention")

    def accumulate_logits(self, logits: torch.Tensor, num_kv_heads: int, *, backend: str = "auto") -> torch.Tensor:
        """:meth:`accumulate` for one decode query whose attention logits are already known (the engine's decode
        attention returns them): ``logits [B, H, L]`` (``-inf`` where masked) -> ``[B, Hkv, L]`` float32
        (``backend`` as in ``sparse_hf.kernels``)."""
        raise NotImplementedError(f"{self.name} does not accumulate attention")

    def prefill_keep_scored(self, layer_idx: int, valid: torch.Tensor, scores: torch.Tensor,
                            positions: torch.Tensor | None = None):
        """Accumulating methods: ``(idx, ok)`` to keep once the prompt is complete, from ``scores [B, Hkv, L]``
        (the prompt's accumulated attention mass) and the slots' logical ``positions`` ``[B, Hkv, L]``, or
        ``None``."""
        raise NotImplementedError(f"{self.name} does not accumulate attention")

    def row_budget(self, valid: torch.Tensor) -> torch.Tensor:
        """Accumulating methods: ``[B]`` long, slots each row may hold during decode, from the prompt's validity
        ``valid [B, Hkv, L]``."""
        raise NotImplementedError(f"{self.name} does not accumulate attention")


class SelectionMethod(SparseMethod):
    """Logical masking: filter layers attend to everything; an *observer* filter layer scores the tokens and the
    sparse layers after it attend only to the selection. Nothing is freed."""

    family = "mask"

    def is_full(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` is a filter layer (full attention)."""
        raise NotImplementedError

    def is_observer(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` is the last filter layer before a run of sparse layers (it selects for them)."""
        raise NotImplementedError

    def select_decode(self, logits: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, reduce_scores=None,
                      scores: torch.Tensor | None = None, in_order: bool = False):
        """An observer's selection at a decode step, with static shapes and no host-device sync.

        Args:
            logits: ``[B, H, L]`` scaled ``q.k`` of the current query over the ``L`` slots (a buffer may hold
                more slots than tokens).
            valid: ``[B, L]`` bool, slots holding a real token.
            lengths: ``[B]`` long device tensor, each row's number of real tokens (fraction budgets resolve
                against it).
            reduce_scores: ``[B, L] -> [B, L]`` applied to the scores before the top-k (tensor parallelism).
            scores: the ``[B, L]`` scores already computed by the caller (a fused kernel), or ``None``.
            in_order: ``True`` when each row's valid slots are one run of its tokens in order (the engine's slot
                tables), so a method that looks at neighbouring tokens need not pack the row first.

        Returns:
            ``(idx, ok)`` each ``[B, K]`` (slot indices, which entries are real), ``K`` fixed by ``L`` only; or
            ``None`` when the budget covers every slot, so the sparse layers attend to everything.
        """
        raise NotImplementedError

    def select_prefill_chunk(self, logits: torch.Tensor, valid: torch.Tensor, query_valid: torch.Tensor):
        """An observer's selection for a later prefill chunk of ``q`` tokens.

        Args:
            logits: ``[B, H, q, L]`` (``L`` includes the chunk itself, at the end); valid: ``[B, L]`` bool;
            query_valid: ``[B, q]`` bool.

        Returns:
            ``(idx, ok)`` ``[B, K]`` over the context before the chunk, or ``None`` (attend to everything).
        """
        raise NotImplementedError


class CompressionMethod(SelectionMethod):
    """Hybrid compression: selection as in :class:`SelectionMethod`, and old raw tokens are *flushed* into
    latents (plus the ids of their reference tokens), then *rebuilt* to K/V at their positions when selected.
    The flush and rebuild math lives in ``sparse_hf.deltakv``; the method decides when and what."""

    family = "compress"

    def flush_count(self, buffered: int) -> int:
        """How many of the oldest ``buffered`` raw-buffer tokens to compress now (0: none)."""
        raise NotImplementedError

    def pick(self, scores: torch.Tensor | None, num_compressed: int, length: int) -> torch.Tensor | None:
        """``[B, k]`` offsets into each row's compressed tokens to rebuild at a decode step (scores ``[B, N]``,
        ``-inf`` past a row's count; ``N = num_compressed``), or ``None`` for all of them."""
        raise NotImplementedError

    def over_row_budget(self, padding: torch.Tensor, length: int) -> torch.Tensor | None:
        """``[B, k]`` bool, ranks of :meth:`pick` past each row's own budget (``padding [B]``: the row's padding
        columns, so its real length is ``length - padding``), or ``None`` when every row has the same budget."""
        return None

    def clustering(self):
        """The per-layer knobs of the compressed state (``sparse_hf.deltakv.state.Clustering``)."""
        raise NotImplementedError
