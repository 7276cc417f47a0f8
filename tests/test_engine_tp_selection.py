"""Selections across tensor-parallel ranks (gloo, two CPU processes, tiny Llama with 2 KV heads: one per rank).

- ``tp_selection="exact"`` (default): a selection shared by every KV head of a layer (``selection_scope="layer"``
  of snapkv, pyramidkv, knorm) all-reduces its scores before the top-k, so TP=2 outputs what TP=1 does.
- ``tp_selection="per_rank"``: each rank selects from its own heads (the reference engine). With one KV head per
  rank, a layer-scope selection on a rank is exactly the kv_head-scope selection of that head, which gives an
  oracle: per-rank layer scope at TP=2 == kv_head scope at TP=1 (and != layer scope at TP=1).
"""

import math

import pytest
import torch

from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM
from sparse_hf.methods import get_method
from test_engine_methods import KNOBS
from test_engine_tp import ENGINE, LENGTHS, assert_same_greedy

NEW_TOKENS = 30


def tp2_tokens(model, prompts, **kwargs):
    with LLM(model, tensor_parallel_size=2, **ENGINE, **kwargs) as llm:
        tokens = engine_tokens(llm, prompts, NEW_TOKENS)
        llm.check_pool_whole()
    return tokens


@pytest.mark.parametrize("method,scope", [("snapkv", "layer"), ("snapkv", "kv_head"), ("pyramidkv", "layer"),
                                          ("pyramidkv", "kv_head"), ("knorm", "layer")])
def test_tp2_equals_tp1_in_both_scopes(method, scope):
    model = tiny_model("llama", layers=4)
    prompts = random_prompts(LENGTHS)
    knobs = dict(KNOBS[method], selection_scope=scope)
    tp1 = engine_tokens(LLM(model, sparse_method=method, **ENGINE, **knobs), prompts, NEW_TOKENS)
    if scope == "layer":
        other = dict(knobs, selection_scope="kv_head")
        assert tp1 != engine_tokens(LLM(model, sparse_method=method, **ENGINE, **other), prompts, NEW_TOKENS), (
            "the scopes give the same output here, so this test could not tell a per-rank selection from an exact one")
    tp2 = tp2_tokens(model, prompts, sparse_method=method, **knobs)
    assert_same_greedy(tp2, tp1, model, prompts, NEW_TOKENS, cache_implementation=method, cache_config=knobs)


def test_per_rank_layer_scope_selects_from_the_ranks_own_heads():
    model = tiny_model("llama", layers=4)
    prompts = random_prompts(LENGTHS)
    layer = dict(KNOBS["snapkv"], selection_scope="layer")
    per_head = dict(KNOBS["snapkv"], selection_scope="kv_head")
    tp1_layer = engine_tokens(LLM(model, sparse_method="snapkv", **ENGINE, **layer), prompts, NEW_TOKENS)
    tp1_per_head = engine_tokens(LLM(model, sparse_method="snapkv", **ENGINE, **per_head), prompts, NEW_TOKENS)
    assert tp1_layer != tp1_per_head
    per_rank = tp2_tokens(model, prompts, sparse_method="snapkv", tp_selection="per_rank", **layer)
    assert_same_greedy(per_rank, tp1_per_head, model, prompts, NEW_TOKENS, cache_implementation="snapkv",
                       cache_config=per_head)


def test_per_rank_omnikv_runs_and_differs_from_exact_only_after_the_prompt():
    """OmniKV per rank: each rank tops its own heads' scores. The prompt (full attention) is the same, so the first
    token equals TP=1's; later tokens may differ by design, and here do (the knob really changes the selection)."""
    model = tiny_model("llama", layers=4)
    prompts = random_prompts(LENGTHS)
    knobs = KNOBS["omnikv"]
    tp1 = engine_tokens(LLM(model, sparse_method="omnikv", **ENGINE, **knobs), prompts, NEW_TOKENS)
    per_rank = tp2_tokens(model, prompts, sparse_method="omnikv", tp_selection="per_rank", **knobs)
    assert [t[0] for t in per_rank] == [t[0] for t in tp1]
    assert per_rank != tp1, "per-rank selection gave TP=1's output: the knob would be untested"
    assert all(len(t) == NEW_TOKENS for t in per_rank)


def test_tp_selection_is_validated():
    with pytest.raises(ValueError, match="tp_selection='all'"):
        LLM(tiny_model("llama", layers=1), tp_selection="all", **ENGINE)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "knorm"])
def test_reduce_heads_hook_gives_the_all_heads_selection(method):
    """The methods' ``reduce_heads`` hook without processes: each half of the heads (a rank) runs ``prefill_keep``
    twice, first recording its partial reduction, then with a reducer that returns the combination of both halves
    (what the all-reduce computes); both halves must keep what one call over every head keeps."""
    B, H, Hkv, L, D, W = 2, 8, 4, 48, 8, 4
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(B, Hkv, L, D, generator=g) * torch.rand(B, Hkv, L, 1, generator=g).add(0.3)
    queries = torch.randn(B, H, W, D, generator=g)
    valid = torch.ones(B, Hkv, L, dtype=torch.bool)
    knobs = dict(num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=7, selection_scope="layer")
    if method != "knorm":
        knobs.update(window_size=4, pool_kernel_size=3)
    m = get_method(method)(get_method(method).build_config(**knobs)[0], 2)
    args = lambda r: (keys[:, 2 * r: 2 * r + 2], valid[:, 2 * r: 2 * r + 2],  # noqa: E731
                      queries[:, 4 * r: 4 * r + 4], None, 1 / math.sqrt(D))
    partial = {}
    for r in (0, 1):
        m.prefill_keep(0, *args(r), reduce_heads=lambda x, op, r=r: partial.setdefault(r, (x.clone(), op))[0])
    (a, op), (b, op_b) = partial[0], partial[1]
    assert op == op_b == ("mean" if method == "knorm" else "max")
    combined = torch.maximum(a, b) if op == "max" else (a + b) / 2
    whole = m.prefill_keep(0, keys, valid, queries, None, 1 / math.sqrt(D))
    for r in (0, 1):
        idx, ok = m.prefill_keep(0, *args(r), reduce_heads=lambda x, op: combined.clone())
        assert torch.equal(idx, whole[0][:, :2]) and torch.equal(ok, whole[1][:, :2])
    alone = m.prefill_keep(0, *args(0))
    assert not torch.equal(alone[0], whole[0][:, :2]), "a rank's own heads select the same: the test proves nothing"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["snapkv", "knorm"])
def test_gpu_tp2_layer_scope_equals_tp1(method):
    """The layer-scope all-reduce over NCCL (fp32, so that only rounding order differs). Needs two GPUs."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    model = tiny_model("llama", layers=4).cuda()
    prompts = random_prompts(LENGTHS)
    knobs = dict(KNOBS[method], selection_scope="layer")
    engine = dict(ENGINE, dtype=torch.float32, sparse_method=method, **knobs)
    tp1 = engine_tokens(LLM(model, **engine), prompts, NEW_TOKENS)
    with LLM(model, tensor_parallel_size=2, **engine) as llm:
        tp2 = engine_tokens(llm, prompts, NEW_TOKENS)
        llm.check_pool_whole()
    assert_same_greedy(tp2, tp1, model, prompts, NEW_TOKENS, cache_implementation=method, cache_config=knobs)
