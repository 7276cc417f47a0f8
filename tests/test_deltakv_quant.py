"""Latent quantization (sparse_hf.deltakv.quant) against a float64 reference."""

import pytest
import torch

from sparse_hf.deltakv.quant import GROUP, QuantizedLatent, dequantize, quantize


@pytest.mark.parametrize("width", [96, 20])   # 3 groups of 32; one group (20 is not a multiple of 32)
def test_int4_error_is_at_most_half_a_step_per_group(width):
    torch.manual_seed(0)
    z = torch.randn(2, 7, width) * torch.linspace(0.01, 5, width)
    stored = quantize(z, 4)
    groups = width // GROUP if width % GROUP == 0 else 1
    assert stored.codes.shape == (2, 7, width // 2) and stored.codes.dtype == torch.uint8
    assert stored.scale.shape == stored.offset.shape == (2, 7, groups) and stored.scale.dtype == torch.float16
    back = dequantize(stored).double()
    zg = z.double().unflatten(-1, (groups, -1))
    lo, hi = zg.amin(-1, keepdim=True), zg.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    err = (back.unflatten(-1, (groups, -1)) - zg).abs()
    # half a step, plus the float16 rounding of the group's minimum and step (relative 2^-11, times 15 steps)
    bound = step / 2 + (lo.abs() + 16 * step) * 2.0 ** -10
    assert bool((err <= bound).all())
    assert stored.nbytes() == 2 * 7 * (width // 2 + 4 * groups)


def test_int4_codes_roundtrip_exactly_and_constant_groups_are_exact():
    z = torch.zeros(1, 3, 64)
    z[0, 1] = 2.5                                    # a constant group: step underflows to the tiny floor
    z[0, 2, :32] = torch.arange(32) % 16             # integer values 0..15 with min 0 and step 1: exact
    back = dequantize(quantize(z, 4))
    assert torch.equal(back[0, :2], z[0, :2])
    assert torch.equal(back[0, 2, :32], z[0, 2, :32])


def test_int8_symmetric_per_token():
    torch.manual_seed(1)
    z = torch.randn(3, 5, 24, dtype=torch.float64)
    stored = quantize(z, 8)
    assert stored.codes.dtype == torch.int8 and stored.offset is None and stored.scale.shape == (3, 5, 1)
    err = (dequantize(stored, torch.float64) - z).abs()
    assert bool((err <= z.abs().amax(-1, keepdim=True) / 254 + 1e-6).all())


def test_select_and_cat_keep_fields_aligned():
    z = torch.randn(2, 6, 32)
    a, b = quantize(z[:, :4], 4), quantize(z[:, 4:], 4)
    joined = a.cat(b)
    pick = torch.tensor([[5, 0], [3, 3]])
    expected = dequantize(quantize(z, 4)).gather(1, pick.unsqueeze(-1).expand(2, 2, 32))
    assert torch.equal(dequantize(joined.select(pick)), expected)
    plain = quantize(z, 0)
    assert isinstance(plain, QuantizedLatent) and plain.scale is None and torch.equal(dequantize(plain), z)
    with pytest.raises(ValueError, match="kv_quant_bits"):
        quantize(z, 2)
