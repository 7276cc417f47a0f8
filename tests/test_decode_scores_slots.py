"""``decode_attention_with_scores(..., slots=)``: K/V read in place from a slot pool through a per-row slot table
(the engine's observation layers), against the same call on a gathered copy; Triton under the interpreter."""

import pytest
import torch

from sparse_hf.kernels import decode_attention_with_scores
from sparse_hf.kernels.dispatch import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"            # the real kernel on a GPU machine


def pool_case(B=3, H=4, Hkv=2, S=50, L=23, D=16):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g)
    k_pool, v_pool = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    slots = torch.stack([torch.randperm(S, generator=g)[:L] for _ in range(B)]).to(torch.int32)   # [B, L]
    lens = torch.tensor([L, 11, 1], dtype=torch.int32)
    return q, k_pool, v_pool, slots, lens


def view(pool, B):
    return pool.permute(1, 0, 2).unsqueeze(0).expand(B, -1, -1, -1)       # [B, Hkv, S, D], stride 0 over rows


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (interpreted on CPU)"))])
@pytest.mark.parametrize("score_mode", ["per_head", "group_max"])
def test_slots_equal_a_gathered_copy(backend, score_mode):
    q, k_pool, v_pool, slots, lens = pool_case()
    B = q.shape[0]
    gathered_k = k_pool[slots.long()].permute(0, 2, 1, 3)                   # [B, Hkv, L, D]
    gathered_v = v_pool[slots.long()].permute(0, 2, 1, 3)
    ref_out, ref_scores = decode_attention_with_scores(q, gathered_k, gathered_v, lengths=lens, backend="torch",
                                                       score_mode=score_mode)
    dev = [t.to(DEVICE) for t in (q, k_pool, v_pool, lens, slots)]
    out, scores = decode_attention_with_scores(dev[0], view(dev[1], B), view(dev[2], B), lengths=dev[3],
                                               backend=backend, score_mode=score_mode, slots=dev[4])
    out, scores = out.cpu(), scores.cpu()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert scores.shape == ref_scores.shape
    finite = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores), finite)
    torch.testing.assert_close(scores[finite], ref_scores[finite], atol=1e-5, rtol=1e-5)


def test_slots_must_be_a_table_per_row():
    q, k_pool, v_pool, slots, lens = pool_case()
    with pytest.raises(ValueError, match="slot table"):
        decode_attention_with_scores(q, view(k_pool, 3), view(v_pool, 3), lengths=lens, slots=slots[:2])
