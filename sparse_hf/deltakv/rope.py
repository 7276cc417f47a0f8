"""RoPE and its inverse in Hugging Face's rotate-half convention, as pure tensor functions.

DeltaKV compresses keys **before** RoPE; the cache keeps post-RoPE keys for its raw tokens and recovers the pre-RoPE
ones with :func:`unrotate` when it compresses them, and puts RoPE back with :func:`rotate` when it rebuilds them.
``cos``/``sin`` come from the model's rotary embedding (rope scaling folded in), ``[B, n, D]``.
"""

from __future__ import annotations

import torch


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``k`` ``[B, Hkv, n, D]`` with ``cos``/``sin`` ``[B, n, D]`` (HF's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos + rotated * sin


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (also with rope scaling folded into ``cos``/``sin``: divides by
    ``cos^2 + sin^2``), so pre-RoPE keys need not be stored: ``[B, Hkv, n, D]``."""
    return rotate(k, cos, -sin) / (cos * cos + sin * sin).unsqueeze(1)
