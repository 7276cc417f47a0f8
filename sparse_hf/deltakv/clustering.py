"""DeltaKV's cluster references and delta compression, as pure tensor functions.

No HF classes here: the HF cache, the training forward and a future engine all call these. Vectors are
``x = concat(K, V)`` before RoPE, ``[..., D]`` with ``D = 2 * num_kv_heads * head_dim``.

- Centers are the sink tokens plus every ``step``-th token after them, ``step = max(1, int(1 / cluster_ratio))``;
  centers are kept raw.
- A token's fathers are its ``k`` nearest **visible** centers (``center_pos <= token_pos``), and its reference is
  the plain mean of the fathers.
- ``latent = down(x) - down(ref)`` and ``recon = up(latent) + ref``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

METRICS = ("l2", "dot", "cosine")


def center_step(cluster_ratio: float) -> int:
    """Distance between consecutive non-sink centers: ``max(1, int(1 / cluster_ratio))``."""
    if not 0.0 < cluster_ratio <= 1.0:
        raise ValueError(f"cluster_ratio={cluster_ratio}: expected a ratio in (0, 1]")
    return max(1, int(1.0 / cluster_ratio))


def center_mask(positions: torch.Tensor, num_sink: int, cluster_ratio: float) -> torch.Tensor:
    """Which tokens are centers, by position: the ``num_sink`` first ones and every step-th one after them.

    positions: integer tensor of any shape (e.g. ``[B, N]``). Returns a bool tensor of the same shape.
    """
    step = center_step(cluster_ratio)
    rel = positions - num_sink
    return (positions < num_sink) | ((rel >= 0) & (rel % step == 0))


def center_scores(x: torch.Tensor, centers: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Similarity of every token to every center, larger = closer: ``[B, N, D] x [B, M, D] -> [B, N, M]``.

    ``l2`` is ``2 x.c - |c|^2`` (= ``|x|^2 - |x - c|^2``, the same ranking as negative distance without the
    square root), ``dot`` is ``x.c`` and ``cosine`` is the dot product of unit vectors.
    """
    if metric == "l2":
        return 2.0 * torch.matmul(x, centers.transpose(-1, -2)) - centers.pow(2).sum(-1).unsqueeze(-2)
    if metric == "dot":
        return torch.matmul(x, centers.transpose(-1, -2))
    if metric == "cosine":
        return torch.matmul(F.normalize(x, dim=-1), F.normalize(centers, dim=-1).transpose(-1, -2))
    raise ValueError(f"unknown cluster metric {metric!r}; expected one of {', '.join(METRICS)}")


#: Most ``[tokens, centers]`` scores :func:`nearest_centers` holds at once per row (64 MB in float32): a long
#: prompt's search runs block by block of tokens, with no ``[N, M]`` intermediate (``N * M`` is ~1.6e9 at 128K).
SCORE_BLOCK = 1 << 24


@torch.no_grad()
def nearest_centers(x: torch.Tensor, centers: torch.Tensor, token_pos: torch.Tensor, center_pos: torch.Tensor,
                    k: int, metric: str = "l2", center_valid: torch.Tensor | None = None,
                    block: int | None = None, visible_prefix: Callable[[int, int], int] | None = None
                    ) -> torch.Tensor:
    """Each token's ``k`` best visible centers, best first, as indices into ``centers``.

    Args:
        x: ``[B, N, D]`` token vectors.
        centers: ``[B, M, D]`` center vectors.
        token_pos: ``[B, N]`` positions of the tokens.
        center_pos: ``[B, M]`` positions of the centers; a center is visible to a token iff
            ``center_pos <= token_pos`` (causality: a token may be its own center).
        k: neighbor count.
        metric: ``"l2"``, ``"dot"`` or ``"cosine"``.
        center_valid: optional ``[B, M]`` bool, False for padding slots of ``centers``.
        block: tokens scored at once (default: as many as keep ``block * M`` within :data:`SCORE_BLOCK`); each
            token's fathers do not depend on the others, so the blocks give the one-shot result.
        visible_prefix: optional host hint ``(i, j) -> m``: no center at index ``>= m`` is visible to tokens
            ``i .. j-1`` (centers in arrival order, e.g. a flush), so a block scores only the first ``m`` centers:
            a causal prompt's search costs about half of ``N * M``.

    Returns:
        ``[B, N, k]`` int64 father ids; ``-1`` where fewer than ``k`` centers are visible.
    """
    if k < 1:
        raise ValueError(f"neighbor count k={k}: expected >= 1")
    n, m = x.shape[-2], centers.shape[-2]
    block = block or max(1, SCORE_BLOCK // max(m, 1))
    out = []
    for i in range(0, n, block):
        j = min(n, i + block)
        mv = m if visible_prefix is None else max(0, min(m, int(visible_prefix(i, j))))
        valid = None if center_valid is None else center_valid[..., :mv]
        out.append(_nearest_block(x[..., i:j, :], centers[..., :mv, :], token_pos[..., i:j], center_pos[..., :mv],
                                  k, metric, valid))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


#: Whether :func:`nearest_centers` may score half-precision CUDA tokens with a half-precision GEMM that
#: accumulates and returns fp32 (``bmm(..., out_dtype=float32)``): the products of bf16/fp16 values are exact in
#: fp32 and the sums are fp32 as before, so the scores are the fp32 scores up to summation order, on tensor cores
#: (the fp32 GEMM is the prompt-end compression's largest cost at 128K). Set False to force the fp32 GEMM.
HALF_GEMM_SCORES = True
_half_gemm_ok: bool | None = None      # None: not tried yet in this process (torch < 2.8 has no out_dtype)


def _half_gemm_scores(x: torch.Tensor, centers: torch.Tensor, metric: str) -> torch.Tensor | None:
    """:func:`center_scores` for ``l2`` / ``dot`` of fp16/bf16 CUDA tensors as fp32, from one half-precision GEMM
    with fp32 accumulation and output; ``None`` where that does not apply (then the caller scores in fp32)."""
    global _half_gemm_ok
    if (not HALF_GEMM_SCORES or _half_gemm_ok is False or metric not in ("l2", "dot") or not x.is_cuda
            or x.dtype not in (torch.float16, torch.bfloat16) or centers.dtype != x.dtype or x.dim() != 3):
        return None
    try:
        dots = torch.bmm(x, centers.transpose(-1, -2), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        _half_gemm_ok = False
        return None
    _half_gemm_ok = True
    if metric == "dot":
        return dots
    return dots.mul_(2.0).sub_(centers.float().pow(2).sum(-1).unsqueeze(-2))


def _nearest_block(x, centers, token_pos, center_pos, k, metric, center_valid):
    """:func:`nearest_centers` of one block of tokens (``[B, n, M]`` scores)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 scores would mis-rank near ties
    scores = _half_gemm_scores(x, centers, metric)
    if scores is None:
        scores = center_scores(x.to(dtype), centers.to(dtype), metric)
    hidden = center_pos.unsqueeze(-2) > token_pos.unsqueeze(-1)   # [B, N, M]: not visible (causality)
    if center_valid is not None:
        hidden.logical_or_(center_valid.logical_not().unsqueeze(-2))
    scores = scores.masked_fill_(hidden, float("-inf"))   # a fresh tensor in both paths
    kk = min(k, centers.shape[-2])
    if kk == 1:   # one father (the usual case): a max reduction, several times faster than top-k on CUDA
        top, ids = scores.max(-1, keepdim=True)
    else:
        top, ids = torch.topk(scores, kk, dim=-1) if kk > 0 else (scores[..., :0], scores[..., :0].long())
    ids = ids.masked_fill(top == float("-inf"), -1)
    if kk < k:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], k - kk), -1)], dim=-1)
    return ids


def reference_from_fathers(centers: torch.Tensor, father_ids: torch.Tensor) -> torch.Tensor:
    """The plain mean of each token's fathers: ``centers [B, M, D]``, ``father_ids [B, N, k]`` -> ``[B, N, D]``.

    Ids of ``-1`` are skipped; a token with no father gets a zero reference (it is then stored as-is).
    Differentiable with respect to ``centers``.
    """
    b, n, k = father_ids.shape
    d = centers.shape[-1]
    valid = father_ids >= 0
    idx = father_ids.clamp(min=0).reshape(b, n * k, 1).expand(-1, -1, d)
    if k == 1:   # one father (the usual case): the mean is the father itself, bit for bit, without three passes
        return centers.gather(1, idx).masked_fill(~valid, 0)
    gathered = centers.gather(1, idx).reshape(b, n, k, d)
    weights = valid.to(centers.dtype).unsqueeze(-1)
    count = valid.sum(-1, keepdim=True).clamp(min=1).to(centers.dtype)
    return (gathered * weights).sum(2) / count


def compress(x: torch.Tensor, ref: torch.Tensor, compressor: Any, layer: int) -> torch.Tensor:
    """``latent = down(x) - down(ref)``: ``[..., D]`` -> ``[..., latent]`` in the compressor's dtype."""
    return compressor.down(layer, x) - compressor.down(layer, ref)


def reconstruct(latent: torch.Tensor, ref: torch.Tensor, compressor: Any, layer: int) -> torch.Tensor:
    """``recon = up(latent) + ref``: ``[..., latent]`` -> ``[..., D]`` in the dtype of ``ref``."""
    return (compressor.up(layer, latent) + ref.to(compressor.dtype)).to(ref.dtype)


def tail_references(x: torch.Tensor, num_sink: int = 16, cluster_ratio: float = 0.1, k: int = 4,
                    metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training clustering of packed blocks (token ``i`` of every row at position ``i``): ``x [B, N, D]`` ->
    ``(tail [N] bool, ref [B, N_tail, D])``, ``tail`` marking the tokens after the ``num_sink`` sinks and ``ref``
    the mean of each one's ``k`` nearest visible centers (``None`` when there is no tail)."""
    b, n, _ = x.shape
    positions = torch.arange(n, device=x.device)
    tail = positions >= num_sink
    if not bool(tail.any()):
        return tail, None
    is_center = center_mask(positions, num_sink, cluster_ratio)
    rows = positions.expand(b, n)
    centers = x[:, is_center]
    fathers = nearest_centers(x[:, tail], centers, rows[:, tail], rows[:, is_center], k, metric)
    return tail, reference_from_fathers(centers, fathers)


def cluster_reconstruct(x: torch.Tensor, compressor: Any, layer: int, num_sink: int = 16,
                        cluster_ratio: float = 0.1, k: int = 4, metric: str = "l2") -> torch.Tensor:
    """Compress and rebuild a whole packed sequence the way DeltaKV training does: ``[B, N, D] -> [B, N, D]``.

    Tokens at position ``< num_sink`` stay raw; every other token (centers included) is replaced by
    ``up(down(x) - down(ref)) + ref``, with ``ref`` from :func:`tail_references`.
    """
    tail, ref = tail_references(x, num_sink, cluster_ratio, k, metric)
    if ref is None:
        return x
    recon = reconstruct(compress(x[:, tail], ref, compressor, layer), ref, compressor, layer)
    out = x.clone()
    out[:, tail] = recon
    return out
