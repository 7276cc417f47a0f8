"""``gather_kv_slots``: the K and V of pool slots into a step buffer, one launch (Triton interpreted on CPU, the
real kernel on a GPU machine) against ``index_select``."""

import pytest
import torch

from sparse_hf.kernels.dispatch import HAS_TRITON
from sparse_hf.kernels.gather_slots import gather_kv_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (interpreted on CPU)"))])
@pytest.mark.parametrize("dv", [16, 12])
def test_equals_index_select(backend, dv):
    g = torch.Generator().manual_seed(0)
    k_pool, v_pool = torch.randn(40, 3, 16, generator=g), torch.randn(40, 3, dv, generator=g)
    slots = torch.randint(0, 40, (23,), generator=g)
    k_pool, v_pool, slots = k_pool.to(DEVICE), v_pool.to(DEVICE), slots.to(DEVICE)
    k_buf, v_buf = torch.zeros(30, 3, 16, device=DEVICE), torch.zeros(30, 3, dv, device=DEVICE)   # a buffer's head
    gather_kv_slots(k_pool, v_pool, slots.to(torch.int32), k_buf[:23], v_buf[:23], backend=backend)
    assert torch.equal(k_buf[:23], k_pool[slots]) and torch.equal(v_buf[:23], v_pool[slots])
    assert not k_buf[23:].any() and not v_buf[23:].any()


def test_wrong_output_shape():
    with pytest.raises(ValueError, match="do not fit"):
        gather_kv_slots(torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.tensor([0, 1]), torch.zeros(3, 2, 8),
                        torch.zeros(2, 2, 8))
