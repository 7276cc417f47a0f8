"""Quantized storage of DeltaKV latents (``kv_quant_bits`` 8 or 4), as pure tensor functions.

- **8 bits:** symmetric, one float32 absmax scale per token: ``code = round(z / s)`` in ``[-127, 127]``, int8.
- **4 bits:** asymmetric per group of :data:`GROUP` values (the whole latent when its width is not a multiple),
  with a float16 minimum and step per group: ``code = round((z - min) / step)`` in ``[0, 15]``, two codes packed
  per uint8 byte (low nibble = even index). Codes are taken against the float16-rounded parameters, so
  :func:`dequantize` inverts exactly what was stored.

A latent of width ``r`` costs ``r + 4`` bytes at 8 bits and ``r / 2 + 4 * r / GROUP`` bytes at 4 bits (60 bytes
for ``r = 96``), against ``2 * r`` in bf16 or ``4 * r`` in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BITS = (0, 4, 8)
GROUP = 32
_TINY16 = 2.0 ** -14   # smallest normal float16: steps below it would underflow


class QuantizedLatent(NamedTuple):
    """Stored latents ``[..., n, *]``; ``offset`` is None at 8 bits, ``scale`` and ``offset`` None unquantized."""

    codes: torch.Tensor
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "QuantizedLatent":
        """Tokens ``index`` ``[B, k]`` of every field (each ``[B, n, w]``): ``gather`` along dim 1."""
        def take(t):
            return None if t is None else t.gather(1, index.unsqueeze(-1).expand(*index.shape, t.shape[-1]))

        return QuantizedLatent(take(self.codes), take(self.scale), take(self.offset))

    def cat(self, other: "QuantizedLatent") -> "QuantizedLatent":
        """Append ``other``'s tokens along dim 1."""
        def join(a, b):
            return b if a is None else torch.cat([a, b], 1)

        return QuantizedLatent(join(self.codes, other.codes), join(self.scale, other.scale),
                               join(self.offset, other.offset))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def check_bits(bits: int, width: int | None = None) -> None:
    """Raise ``ValueError`` unless ``bits`` is supported (and, at 4 bits, ``width`` is even)."""
    if bits not in BITS:
        raise ValueError(f"kv_quant_bits={bits!r}: supported values are 0 (no quantisation), 8 and 4")
    if bits == 4 and width is not None and width % 2:
        raise ValueError(f"kv_quant_bits=4 packs two codes per byte: the latent width {width} must be even")


def _groups(width: int) -> int:
    return width // GROUP if width % GROUP == 0 else 1


def quantize(latent: torch.Tensor, bits: int) -> QuantizedLatent:
    """``latent [..., r]`` (float) -> :class:`QuantizedLatent` (``bits`` 0 keeps it as it is)."""
    check_bits(bits, latent.shape[-1])
    if bits == 0:
        return QuantizedLatent(latent)
    z = latent.float()
    if bits == 8:
        scale = z.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
        return QuantizedLatent((z / scale).round().clamp(-127, 127).to(torch.int8), scale)
    groups = _groups(z.shape[-1])
    zg = z.unflatten(-1, (groups, -1))                                     # [..., G, r/G]
    low = zg.amin(-1).to(torch.float16)
    step = ((zg.amax(-1) - low.float()) / 15.0).clamp_min(_TINY16).to(torch.float16)
    codes = ((zg - low.float().unsqueeze(-1)) / step.float().unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    codes = codes.flatten(-2)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedLatent(packed, step, low)


def dequantize(stored: QuantizedLatent, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`quantize`: ``[..., r]`` in ``dtype``."""
    if stored.scale is None:
        return stored.codes.to(dtype)
    if stored.offset is None:                                              # 8 bits
        return (stored.codes.float() * stored.scale).to(dtype)
    packed = stored.codes
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2).float()  # [..., r]
    groups = stored.scale.shape[-1]
    zg = codes.unflatten(-1, (groups, -1)) * stored.scale.float().unsqueeze(-1) + stored.offset.float().unsqueeze(-1)
    return zg.flatten(-2).to(dtype)
