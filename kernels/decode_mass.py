"""The attention mass one decode query gives every slot (H2O's per-step score update), from the ``[B, H, L]`` logits
the decode attention returns anyway (``decode_attention_with_scores``): the same sum as
:func:`~sparse_hf.kernels.attention_mass.attention_mass_ref` for one query, in two reads of the logits (per-head
max and sum over key splits, then the group's probabilities per key block) instead of torch's softmax, NaN clean-up
and head sum.
"""

from __future__ import annotations

import torch

from .attention_mass import attention_probabilities
from .dispatch import HAS_TRITON, next_pow2, plan_splits, tl, triton, use_triton


def decode_attention_mass_ref(logits: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The attention mass one decode query gives every slot, from the logits its attention computed anyway (torch
    version).

    Args:
        logits: ``[B, H, L]`` ``scaling * q.k`` with masked slots ``-inf`` (what ``decode_attention_with_scores``
            returns); num_kv_heads: ``Hkv``.

    Returns:
        ``[B, Hkv, L]`` float32: the probabilities summed over the ``G`` query heads of each KV head (what
        :func:`attention_mass_ref` gives for one query).
    """
    B, H, L = logits.shape
    probs = attention_probabilities(logits.float())
    return probs.view(B, num_kv_heads, H // num_kv_heads, L).sum(2)


if HAS_TRITON:

    @triton.jit
    def _decode_mass_kernel(S, ML, OUT, L, split, num_splits, ss_b, ss_h, ss_l,
                            HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                            MASS_PASS: tl.constexpr):
        # Pass 1 (MASS_PASS=False): program (b * HKV + kvh, split) -> ML[b, h, split, 0:2], the max and the sum of
        # exp(s - max) of each of the group's heads over its split. Pass 2: program (b * HKV + kvh, key block) ->
        # OUT[b, kvh, l] = sum over the heads of exp(s - lse) (ML then holds lse in [..., 0]).
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        kvh = (pid % HKV).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        gm = g < G
        heads = kvh * G + g
        s_rows = S + b * ss_b + heads[:, None] * ss_h
        ml_rows = ML + ((b * HKV * G + heads) * num_splits) * 2
        if MASS_PASS:
            offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            inr = offs < L
            s = tl.load(s_rows + offs[None, :] * ss_l, mask=gm[:, None] & inr[None, :], other=float("-inf"))
            lse = tl.load(ml_rows, mask=gm, other=0.0)
            lse = tl.where(lse > float("-inf"), lse, 0.0)     # a head with no key: every s is -inf, p = 0
            tl.store(OUT + pid.to(tl.int64) * L + offs, tl.sum(tl.exp(s - lse[:, None]), 0), mask=inr)
        else:
            sp = tl.program_id(1)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            end = tl.minimum(sp * split + split, L)
            for n0 in range(sp * split, end, BLOCK_N):
                offs = n0 + tl.arange(0, BLOCK_N)
                s = tl.load(s_rows + offs[None, :] * ss_l, mask=gm[:, None] & (offs < end)[None, :],
                            other=float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
                l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
                m = m_new
            tl.store(ml_rows + sp * 2, m, mask=gm)
            tl.store(ml_rows + sp * 2 + 1, l, mask=gm)
else:  # pragma: no cover - exercised only without triton
    _decode_mass_kernel = None


def decode_attention_mass(logits: torch.Tensor, num_kv_heads: int, backend: str = "auto", *,
                          split_size: int | None = None) -> torch.Tensor:
    """:func:`decode_attention_mass_ref`'s result by a Triton kernel where :func:`~.dispatch.use_triton` says: two
    reads of the ``[B, H, L]`` logits (per-head max and sum over key splits, then the group's probabilities per
    key block) instead of torch's softmax, NaN clean-up and head sum (about six). ``split_size``: keys per split of
    the first pass (default: enough splits to fill the GPU)."""
    B, H, L = logits.shape
    if H % num_kv_heads:
        raise ValueError(f"logits have {H} heads, not a multiple of num_kv_heads={num_kv_heads}")
    if not use_triton(backend, _decode_mass_kernel, logits):
        return decode_attention_mass_ref(logits, num_kv_heads)
    G, dev = H // num_kv_heads, logits.device
    out = torch.zeros(B, num_kv_heads, L, dtype=torch.float32, device=dev)
    if B == 0 or L == 0:
        return out
    block_n = 128
    split, S, _ = plan_splits(L, B * num_kv_heads, dev, split_size, max_block=block_n)
    ml = torch.empty(B, H, S, 2, dtype=torch.float32, device=dev)
    meta = dict(HKV=num_kv_heads, G=G, BLOCK_G=max(2, next_pow2(G)), BLOCK_N=block_n)
    _decode_mass_kernel[(B * num_kv_heads, S)](logits, ml, out, L, split, S, *logits.stride(), MASS_PASS=False,
                                               **meta)
    m, l = ml.unbind(-1)                                                       # [B, H, S] each
    top = m.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = top + torch.log((l * torch.exp(m - top)).sum(-1, keepdim=True))     # [B, H, 1]; -inf: nothing allowed
    lse = torch.stack((lse, lse), -1).contiguous()                             # [B, H, 1, 2], num_splits = 1
    _decode_mass_kernel[(B * num_kv_heads, -(-L // block_n))](logits, lse, out, L, block_n, 1, *logits.stride(),
                                                              MASS_PASS=True, **meta)
    return out
