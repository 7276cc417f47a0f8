"""Pure-torch implementations of the decode kernels.

Why: they are the fallback when Triton cannot run (no Triton, CPU tensors without the interpreter, float64),
and the readable specification of what each Triton kernel computes. They compute in float32 (float64 when the
inputs are float64) and may materialise gathered copies; the Triton kernels read K/V in place.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads (``G = H // Hkv`` query heads per KV group; query head
``h`` uses KV head ``h // G``), ``L`` cache length, ``D`` head dim, ``K`` index-list length, ``W`` window.
Rows with no usable key produce a zero attention output.
"""

from __future__ import annotations

import torch

SCORE_MODES = ("per_head", "group_max", "all_max")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _safe_softmax_weights(s: torch.Tensor) -> torch.Tensor:
    """``exp(s - max)`` along the last dim with all ``-inf`` rows mapped to zeros (not NaN)."""
    if s.shape[-1] == 0:
        return s.clone()
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(s - m)


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    B, H, D = q.shape
    Bk, Hkv, L, Dk = k.shape
    if Bk != B or Dk != D or H % Hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)} (need H % Hkv == 0)")
    return B, H, D, Hkv, L, H // Hkv


def sparse_decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                                num_indices: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of one query per sequence over a list of cache positions (torch version).

    Args:
        q: ``[B, H, D]`` query of the current token.
        k, v: ``[B, Hkv, L, D]`` caches, any strides.
        indices: ``[B, Hkv, K]`` int positions along ``L``; entries ``< 0`` or ``>= L`` are ignored.
        num_indices: optional ``[B]`` int, only the first ``num_indices[b]`` entries of row ``b`` are used.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, D]`` in ``q.dtype``.
    """
    B, H, D, Hkv, L, G = _check_gqa(q, k)
    cdt = _compute_dtype(q)
    scale = D ** -0.5 if scale is None else float(scale)
    idx = indices.long()
    n = idx.shape[-1]
    ok = (idx >= 0) & (idx < L)
    if num_indices is not None:
        ar = torch.arange(n, device=idx.device)
        ok &= ar.view(1, 1, n) < num_indices.to(idx.device).long().view(B, 1, 1)
    safe = idx.clamp(0, max(L - 1, 0)).unsqueeze(-1).expand(B, Hkv, n, D)
    kg = torch.gather(k, 2, safe).to(cdt)                                     # [B, Hkv, K, D]
    vg = torch.gather(v, 2, safe).to(cdt)
    qg = q.reshape(B, Hkv, G, D).to(cdt)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, kg) * scale
    s = s.masked_fill(~ok.unsqueeze(2), float("-inf"))
    p = _safe_softmax_weights(s)
    out = torch.einsum("bhgk,bhkd->bhgd", p, vg) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.reshape(B, H, D).to(q.dtype)


def decode_key_mask(B: int, L: int, device, lengths: torch.Tensor | None,
                    valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` bool: key ``j`` of row ``b`` is attended iff ``j < lengths[b]`` and ``valid[b, j]``."""
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    if lengths is not None:
        mask &= torch.arange(L, device=device).view(1, L) < lengths.to(device).long().view(B, 1)
    if valid is not None:
        mask &= valid.to(device=device, dtype=torch.bool)
    return mask


def reduce_scores(s: torch.Tensor, Hkv: int, score_mode: str) -> torch.Tensor:
    """Reduce per-head logits ``[B, H, L]`` to the requested ``score_mode`` (see module doc)."""
    B, H, L = s.shape
    if score_mode == "per_head":
        return s
    if score_mode == "group_max":
        return s.view(B, Hkv, H // Hkv, L).amax(2)
    if score_mode == "all_max":
        return s.amax(1)
    raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")


def decode_attention_with_scores_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     lengths: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                                     scale: float | None = None, score_mode: str = "per_head"):
    """Full decode attention that also returns the per-token logits (torch version).

    Args:
        q: ``[B, H, D]``; k, v: ``[B, Hkv, L, D]`` any strides.
        lengths: optional ``[B]`` int, row ``b`` attends keys ``j < lengths[b]`` (default ``L``).
        valid: optional ``[B, L]`` bool, additionally masks keys.
        scale: softmax scale, default ``D ** -0.5``.
        score_mode: ``"per_head"`` -> ``[B, H, L]``, ``"group_max"`` -> ``[B, Hkv, L]``, ``"all_max"`` -> ``[B, L]``.

    Returns:
        ``(out [B, H, D] in q.dtype, scores float32)``; scores are ``scale * q.k`` with masked keys ``-inf``.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    B, H, D, Hkv, L, G = _check_gqa(q, k)
    cdt = _compute_dtype(q)
    scale = D ** -0.5 if scale is None else float(scale)
    mask = decode_key_mask(B, L, q.device, lengths, valid)
    qg = q.reshape(B, Hkv, G, D).to(cdt)
    s = torch.einsum("bhgd,bhld->bhgl", qg, k.to(cdt)) * scale
    s = s.masked_fill(~mask.view(B, 1, 1, L), float("-inf"))
    p = _safe_softmax_weights(s)
    out = torch.einsum("bhgl,bhld->bhgd", p, v.to(cdt)) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    scores = reduce_scores(s.reshape(B, H, L).float(), Hkv, score_mode)
    return out.reshape(B, H, D).to(q.dtype), scores


HEAD_REDUCES = ("group", "all")

#: Elements of one ``[B, H, chunk, L]`` logits block in the chunked SnapKV reference (64 MiB in float32).
SNAPKV_CHUNK_ELEMENTS = 1 << 24


def snapkv_prefill_scores_ref(q_window: torch.Tensor, k: torch.Tensor, candidate_mask: torch.Tensor,
                              scale: float | None = None, query_valid: torch.Tensor | None = None,
                              head_reduce: str = "group", *, window_chunk: int | None = None) -> torch.Tensor:
    """SnapKV importance of each key for an observation window of queries (torch version).

    For every query head and window query: softmax of ``scale * q.k`` over the candidate keys only; then the
    mean over the (valid) window queries, then the max over the query heads of each KV group (``head_reduce=
    "group"``) or over all heads of the layer (``"all"``). The window is processed ``window_chunk`` queries at a
    time, so memory is ``O(B * H * L)`` plus one ``[B, H, window_chunk, L]`` block, never ``[B, H, W, L]``.

    Args:
        q_window: ``[B, H, W, D]`` the last ``W`` prompt queries.
        k: ``[B, Hkv, L, D]`` keys, any strides.
        candidate_mask: ``[B, L]`` or ``[B, Hkv, L]`` bool, keys that may be chosen.
        scale: default ``D ** -0.5``.
        query_valid: optional ``[B, W]`` bool, window queries to average over (default all).
        head_reduce: ``"group"`` -> ``[B, Hkv, L]``; ``"all"`` -> ``[B, 1, L]``.
        window_chunk: window queries per block (default: as many as fit :data:`SNAPKV_CHUNK_ELEMENTS`).

    Returns:
        float32 scores (probabilities averaged over the window); non-candidates are ``0``.
    """
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCES}, got {head_reduce!r}")
    B, H, W, D = q_window.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    cdt = _compute_dtype(q_window)
    scale = D ** -0.5 if scale is None else float(scale)
    cand = candidate_mask.to(torch.bool)
    cand = cand.view(B, 1, L).expand(B, Hkv, L) if cand.dim() == 2 else cand
    weights = (torch.ones(B, W, dtype=cdt, device=q_window.device) if query_valid is None
               else query_valid.to(device=q_window.device, dtype=cdt))
    kc = k.to(cdt)
    chunk = window_chunk or max(1, SNAPKV_CHUNK_ELEMENTS // max(1, B * H * L))
    total = torch.zeros(B, Hkv, G, L, dtype=cdt, device=q_window.device)    # sum over window queries
    for w0 in range(0, W, chunk):
        qg = q_window[:, :, w0:w0 + chunk].reshape(B, Hkv, G, -1, D).to(cdt)
        s = torch.einsum("bhgwd,bhld->bhgwl", qg, kc) * scale
        s = s.masked_fill(~cand.view(B, Hkv, 1, 1, L), float("-inf"))
        p = _safe_softmax_weights(s)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        total += torch.einsum("bhgwl,bw->bhgl", p, weights[:, w0:w0 + chunk])
    scores = (total / weights.sum(1).clamp_min(1.0).view(B, 1, 1, 1)).amax(2)
    if head_reduce == "all":
        scores = scores.amax(1, keepdim=True)
    return scores.float()


def append_kv_ref(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, counters: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[B, Hkv, 1, D]`` at slot ``counters[0]`` of ``k_buf``/``v_buf``
    ``[B, Hkv, capacity, D]`` and ``counters[1]`` at that slot of ``pos_buf`` ``[B, Hkv, capacity]`` (in place;
    the caller advances the counters)."""
    B, Hkv = key.shape[:2]
    slot = counters[0:1]
    k_buf.index_copy_(2, slot, key)
    v_buf.index_copy_(2, slot, value)
    pos_buf.index_copy_(2, slot, counters[1:2].view(1, 1, 1).expand(B, Hkv, 1))


def store_kv_slots_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor, pos_pool: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> None:
    """Write token ``t``'s ``key[t]``/``value[t]`` (``[T, Hkv, D]``) into slot ``slot_mapping[t]`` of
    ``k_pool``/``v_pool`` (``[num_slots, Hkv, D]``) and ``positions[t]`` into ``pos_pool[slot]`` (``[num_slots]``
    or ``[num_slots, Hkv]``); tokens whose slot is ``< 0`` are skipped. In place."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_pool.index_copy_(0, slots, key[keep].to(k_pool.dtype))
    v_pool.index_copy_(0, slots, value[keep].to(v_pool.dtype))
    if pos_pool is not None:
        pos = positions[keep].to(pos_pool.dtype)
        if pos_pool.dim() == 2:
            pos = pos.view(-1, 1).expand(-1, pos_pool.shape[1])
        pos_pool.index_copy_(0, slots, pos)


def deltakv_latent_row(pick: torch.Tensor, step: int, num_latents: int) -> torch.Tensor:
    """``[B, k]`` long: the latent row of each picked compressed offset (``pick - pick // step - 1``), clamped into
    ``[0, num_latents)`` (centers and ``-1`` fillers get some row; the caller ignores what is rebuilt there)."""
    p = pick.long().clamp(min=0)
    return (p - p // step - 1).clamp(0, max(num_latents - 1, 0))


def deltakv_gather_latents_ref(pick: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None,
                               offset: torch.Tensor | None, step: int, dtype: torch.dtype) -> torch.Tensor:
    """The latents of picked compressed offsets, dequantised (torch version of the gather kernel).

    Args:
        pick: ``[B, k]`` compressed offsets (``-1``: a filler).
        codes: ``[B, N', w]``: float latents (``scale`` None), int8 codes (``offset`` None, ``scale [B, N', 1]``
            float32 absmax step) or uint8 pairs of 4-bit codes (low nibble = even index; ``scale``/``offset``
            ``[B, N', G]`` float16 step and minimum per group of ``r / G`` values).
        step: the distance between centers (offset ``j`` is latent row ``j - j // step - 1``).

    Returns:
        ``[B, k, r]`` in ``dtype``.
    """
    B, k = pick.shape
    row = deltakv_latent_row(pick, step, codes.shape[1])

    def take(t):
        return t.gather(1, row.unsqueeze(-1).expand(B, k, t.shape[-1]))

    c = take(codes)
    if scale is None:
        return c.to(dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if offset is None:
        return (c.to(cdt) * take(scale).to(cdt)).to(dtype)
    q = torch.stack([c & 15, c >> 4], -1).flatten(-2).to(cdt)                    # [B, k, r]
    s, o = take(scale).to(cdt), take(offset).to(cdt)
    z = q.unflatten(-1, (s.shape[-1], -1)) * s.unsqueeze(-1) + o.unsqueeze(-1)
    return z.flatten(-2).to(dtype)


def deltakv_writeback_ref(pick: torch.Tensor, up_out: torch.Tensor | None, fathers: torch.Tensor | None,
                          center_x: torch.Tensor, step: int, num_sink: int, cos: torch.Tensor, sin: torch.Tensor,
                          k_out: torch.Tensor, v_out: torch.Tensor, k_norm_weight: torch.Tensor | None = None,
                          k_norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuilt K/V of picked compressed offsets, written into scratch slots (torch version of the writeback kernel).

    Token ``j`` of row ``b`` (offset ``p = pick[b, j]``) is ``x = center_x[b, num_sink + p // step]`` when it is a
    center (``p % step == 0``), else ``up_out[b, j] + mean(center_x[b, f] for f in fathers[b, row(p)] if f >= 0)``
    (no valid father: no reference). ``x = concat(K, V)`` pre-RoPE; K is split per head, RMS-normed with
    ``k_norm_weight [D]`` when given (Qwen3's ``k_norm``: ``w * k / sqrt(mean(k^2) + eps)``), rotated
    (rotate-half) with ``cos``/``sin [B, k, D]`` and written to ``k_out [B, Hkv, k, D]``; V to ``v_out [B, Hkv, k,
    Dv]``. Fillers (``p < 0``) get whatever offset 0 holds: their columns must be ``-1``.

    Args:
        up_out: ``[B, k, Dx]`` ``up(latent)`` of each pick (any value at centers), or ``None`` when no latent exists.
        fathers: ``[B, N', nbr]`` center ids per latent row (``-1``: none), or ``None``.
        center_x: ``[B, M, Dx]`` raw centers (sinks first).

    Returns:
        ``(k_out, v_out)``, written in place.
    """
    B, k = pick.shape
    _, Hkv, _, D = k_out.shape
    Dx = center_x.shape[-1]
    cdt = _compute_dtype(center_x)
    p = pick.long().clamp(min=0)
    cidx = (num_sink + p // step).clamp(max=center_x.shape[1] - 1)
    x = center_x.gather(1, cidx.unsqueeze(-1).expand(B, k, Dx)).to(cdt)
    if fathers is not None and fathers.shape[1] > 0 and up_out is not None:
        row = deltakv_latent_row(pick, step, fathers.shape[1])
        f = fathers.gather(1, row.unsqueeze(-1).expand(B, k, fathers.shape[-1])).long()   # [B, k, nbr]
        ok = (f >= 0).to(cdt)
        got = center_x.gather(1, f.clamp(min=0).view(B, -1, 1).expand(B, f.shape[1] * f.shape[2], Dx))
        mean = (got.view(B, k, -1, Dx).to(cdt) * ok.unsqueeze(-1)).sum(2) / ok.sum(-1, keepdim=True).clamp(min=1)
        x = torch.where((p % step == 0).unsqueeze(-1), x, up_out.to(cdt) + mean)
    kx = x[..., :Hkv * D].reshape(B, k, Hkv, D).transpose(1, 2)                  # [B, Hkv, k, D]
    vx = x[..., Hkv * D:].reshape(B, k, Hkv, -1).transpose(1, 2)
    if k_norm_weight is not None:
        kx = kx * torch.rsqrt(kx.pow(2).mean(-1, keepdim=True) + k_norm_eps) * k_norm_weight.to(cdt)
    c, s = cos.to(cdt).unsqueeze(1), sin.to(cdt).unsqueeze(1)
    half = D // 2
    kx = kx * c + torch.cat([-kx[..., half:], kx[..., :half]], -1) * s
    k_out.copy_(kx.to(k_out.dtype))
    v_out.copy_(vx.to(v_out.dtype))
    return k_out, v_out


# -- decoder-layer ops of the engine (fused by :mod:`sparse_hf.kernels.fused_layer`) --------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, with transformers' rounding: ``weight * (x.float() * rsqrt(mean(x^2) + eps))
    .to(x.dtype)``.

    Args:
        x: ``[..., N]``; weight: ``[N]``.
        residual: optional ``[..., N]`` like ``x``: first ``residual += x`` in place (in ``x.dtype``, as
            ``residual + hidden`` in transformers), then the sum is normalised.

    Returns:
        ``[..., N]`` in ``weight``'s and ``x``'s promoted dtype.
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in ``x.dtype`` (transformers' order and rounding); ``x`` ``[T, heads, D]``,
    ``cos``/``sin`` ``[T, D]`` (any float dtype, cast to ``x.dtype`` first)."""
    c = cos.unsqueeze(1).to(x.dtype)
    s = sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s


def rope_qkv_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None, eps: float = 1e-6, k_pool: torch.Tensor | None = None,
                 v_pool: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None):
    """RoPE on the q and k parts of a fused QKV projection, in place, optionally after a per-head RMSNorm of q and
    k (Qwen3) and followed by the store of k and v into a slot pool.

    Args:
        qkv: ``[T, (H + 2 * Hkv) * D]`` (last dim contiguous), rewritten in place.
        positions: ``[T]`` int, each token's absolute position (row of ``cos``/``sin``).
        cos, sin: ``[P, D]`` tables (``cos[p] = cos(p * inv_freq)`` repeated over both halves, scaling folded in).
        q_norm, k_norm: optional ``[D]`` per-head RMSNorm weights (both or neither); eps: their epsilon.
        k_pool, v_pool, slot_mapping: optional, as :func:`store_kv_slots_ref` (``[S, Hkv, D]``, ``[T]``).

    Returns:
        ``(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D])`` views of ``qkv`` (q and k rotated).
    """
    T = qkv.shape[0]
    D = cos.shape[-1]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q, k, v = q.view(T, num_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D)
    qn, kn = q, k
    if q_norm is not None:
        qn, kn = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    c, s = cos[positions], sin[positions]
    q.copy_(rope_rotate_ref(qn, c, s))
    k.copy_(rope_rotate_ref(kn, c, s))
    if k_pool is not None:
        store_kv_slots_ref(k_pool, v_pool, k, v, slot_mapping)
    return q, k, v


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection ``[T, 2 * I]`` (gate first) -> ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def paged_prefill_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                                segments, scale: float | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed prompt chunks over their rows' pool slots (torch version of
    :func:`~sparse_hf.kernels.paged_prefill.paged_prefill_attention`; gathers each row's K/V).

    Args:
        q: ``[T, H, D]``; k_pool, v_pool: ``[S, Hkv, D]``; tables: ``[rows, W]`` int slot table.
        segments: ``[(row, start, length, context), ...]``: queries ``start .. start + length`` are the last
            ``length`` of the row's ``context`` tokens; query ``i`` of the chunk sees keys
            ``0 .. context - length + i`` (lower-right causal). Queries outside every segment get zeros.
        lse: optional ``[T, H]`` float32, filled in place for the segments' queries with their natural-log
            log-sum-exp of ``scale * q.k`` over the keys they see.

    Returns:
        ``[T, H, D]`` in ``q.dtype``.
    """
    T, H, D = q.shape
    Hkv = k_pool.shape[1]
    G = H // Hkv
    cdt = _compute_dtype(q)
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.zeros_like(q)
    for row, start, n, context in segments:
        slots = tables[row, :context].long()
        k, v = k_pool[slots].to(cdt), v_pool[slots].to(cdt)                     # [L, Hkv, D]
        qs = q[start: start + n].to(cdt).view(n, Hkv, G, D)
        s = torch.einsum("nhgd,lhd->hgnl", qs, k) * scale                        # [Hkv, G, n, L]
        seen = torch.arange(context, device=q.device).view(1, -1) <= (
            torch.arange(n, device=q.device).view(-1, 1) + context - n)          # [n, L]
        s = s.masked_fill(~seen, float("-inf"))
        p = _safe_softmax_weights(s)
        o = torch.einsum("hgnl,lhd->nhgd", p, v) / p.sum(-1).permute(2, 0, 1).unsqueeze(-1)
        out[start: start + n] = o.reshape(n, H, D).to(q.dtype)
        if lse is not None:
            lse[start: start + n] = torch.logsumexp(s, -1).permute(2, 0, 1).reshape(n, H).float()
    return out


def deltakv_stage_raw_ref(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor,
                          k_work: torch.Tensor, v_work: torch.Tensor, pos_work: torch.Tensor) -> None:
    """A DeltaKV layer's raw slots and its rebuilt tokens' columns into the shared work buffer, in place: slots
    ``[0, cap)`` of ``k_work``/``v_work``/``pos_work`` get ``k``/``v``/``pos`` (``[B, Hkv, cap, *]``), and the column
    table of the ``s`` slots after them gets ``cols [B, s]`` in every KV head (``pos_work [B, Hkv, >= cap + s]``)."""
    cap, s = k.shape[2], cols.shape[1]
    k_work[:, :, :cap].copy_(k)
    v_work[:, :, :cap].copy_(v)
    pos_work[:, :, :cap].copy_(pos)
    pos_work[:, :, cap:cap + s].copy_(cols.unsqueeze(1).expand(cols.shape[0], pos_work.shape[1], s))


def deltakv_pick_scores_ref(scores: torch.Tensor, comp_pos: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """An observer's ``scores [B, L]`` (by logical column) of a DeltaKV layer's compressed tokens, in offset order:
    ``[B, N]``, token ``j`` of row ``b`` at column ``comp_pos[b, j] + offset[b]``, ``-inf`` where ``comp_pos < 0``
    (no token). ``comp_pos [B, N]`` int, ``offset [B, 1]`` int (each row's padding)."""
    absent = comp_pos < 0
    cols = (comp_pos.long() + offset).masked_fill(absent, 0)
    return scores.gather(1, cols).masked_fill(absent, float("-inf"))


def deltakv_pick_columns_ref(pick: torch.Tensor, keep: torch.Tensor, comp_pos: torch.Tensor,
                             offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Picked compressed offsets ``pick [B, k]`` (``keep [B, k]`` bool: read them) -> ``(cols, pos)`` ``[B, k]`` int64:
    their logical columns (``-1`` where not kept or no token) and RoPE positions (``comp_pos`` at ``max(pick, 0)``)."""
    pos = comp_pos.gather(1, pick.clamp(min=0)).long()
    return torch.where(keep & (pos >= 0), pos + offset, -1), pos
