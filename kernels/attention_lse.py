"""Attention that also returns each query's log-sum-exp, from one fused SDPA kernel.

Why: H2O's prompt score (:func:`~sparse_hf.kernels.attention_mass.attention_mass`) needs every query's
log-sum-exp over the keys it attends to, which the prefill attention computes anyway. On the CPU, SDPA runs
torch's flash kernel, whose private op also returns the log-sum-exp: calling that op directly gives the same
output as SDPA (the same kernel) plus the log-sum-exp for free. On CUDA the callers take cuDNN's op
(:mod:`sparse_hf.kernels.sdpa_split`), the paged Triton kernel (``paged_prefill_attention(..., lse=...)``) or, for a
lower-right causal chunk in fp32, the memory-efficient kernel (:func:`efficient_attention_with_lse`, the one SDPA
runs for ``causal_lower_right``); where none runs they get ``None`` and the mass computes the log-sum-exp itself.
"""

from __future__ import annotations

import torch

from .sdpa_split import SplitUnavailable, sdpa_with_lse


def causal_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """A whole causal prompt's attention and each query's log-sum-exp from the first fused kernel that runs here,
    and that kernel's name; ``None`` where none does.

    CPU: torch's flash op (``"cpu_flash"``, :func:`sdpa_with_lse_cpu`). CUDA: cuDNN's (``"cudnn"``,
    :func:`~sparse_hf.kernels.sdpa_split.sdpa_with_lse`; what SDPA runs for HF's unpadded prompt), else the
    memory-efficient kernel (``"efficient"``, :func:`efficient_attention_with_lse`): cuDNN's attention is fp16/bf16
    only, so fp32 takes this one (as the HF path's prompt and the engine's fp32 gather route do).

    Args:
        q: ``[B, H, n, D]``; k, v: ``[B, Hkv, n, D]`` (square causal: query ``i`` sees keys ``0 .. i``).

    Returns:
        ``(out [B, H, n, D] in q.dtype, lse [B, H, n] float32 natural log, kernel)`` or ``None``.
    """
    if q.device.type == "cpu":
        fused, kernel = sdpa_with_lse_cpu(q, k, v, scale, causal=True), "cpu_flash"
    else:
        try:
            fused, kernel = sdpa_with_lse(q, k, v, True, scale), "cudnn"
        except SplitUnavailable:
            fused, kernel = efficient_attention_with_lse(q, k, v, scale), "efficient"
    return None if fused is None else (*fused, kernel)


def sdpa_with_lse_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None, causal: bool = False):
    """``(out, lse)`` of softmax attention, or ``None`` where the fused op does not run here (not CPU, or refused).

    Args:
        q: ``[B, H, n, D]``; k, v: ``[B, Hkv, L, D]`` (``H % Hkv == 0``, GQA read in place).
        scale: softmax scale.
        mask: ``[B or 1, 1 or H, n, L]`` bool (``True`` = attend) or additive float, or ``None``.
        causal: without ``mask``: query ``i`` sees keys ``0 .. L - n + i`` (lower-right causal; square for
            ``L == n``); ignored with a mask.

    Returns:
        ``(out [B, H, n, D] in q.dtype, lse [B, H, n] float32, natural log)``: a query that sees no key gets
        ``-inf`` (its output is whatever SDPA gives it).
    """
    if q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype):
        return None
    n, L = q.shape[2], k.shape[2]
    is_causal = mask is None and causal and n == L
    if mask is None and causal and n != L:
        mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(q.dtype)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                              attn_mask=mask, scale=scale)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return out, lse.float()


def efficient_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                 mask: torch.Tensor | None = None):
    """CUDA: attention by the memory-efficient kernel asking it for the log-sum-exp, called as SDPA calls it; ``None``
    where it does not run. Without ``mask``: lower-right causal (query ``i`` of ``n`` sees keys ``0 .. L - n + i``;
    what SDPA runs for a ``causal_lower_right`` bias in fp32). With ``mask``: that mask as an additive bias (what
    SDPA runs for a masked call: the bias padded to 16 columns for the kernel's alignment, expanded over heads).

    Args:
        q: ``[B, H, n, D]``; k, v: ``[B, Hkv, L, D]`` (KV heads repeated here for GQA: the kernel wants ``H``).
        mask: ``[B or 1, 1 or H, n, L]`` bool (``True`` = attend) or additive float, or ``None``.

    Returns:
        ``(out [B, H, n, D] in q.dtype, lse [B, H, n] float32, natural log)`` or ``None``.
    """
    if q.device.type != "cuda":
        return None
    B, H, n, _ = q.shape
    L = k.shape[2]
    G = H // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    try:
        if mask is None:
            r = torch.ops.aten._efficient_attention_forward(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0,
                2, True, scale=scale)                     # custom_mask_type 2: lower-right causal
            out = r[0].transpose(1, 2)
        else:
            bias = torch.zeros(*mask.shape[:3], -(-L // 16) * 16, dtype=q.dtype, device=q.device)[..., :L]
            # masked: the dtype's lowest finite value, not -inf, so that a row with no key (a padding query)
            # gets finite garbage rather than NaN, which p.v would carry into every row through its value
            if mask.dtype == torch.bool:
                bias.masked_fill_(~mask, torch.finfo(q.dtype).min)
            else:
                bias.copy_(mask)
            r = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias.expand(B, H, n, L), True, 0.0, False, scale=scale)
            out = r[0]
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return out, r[1][..., :n].float()                    # the kernel pads the lse's query axis
