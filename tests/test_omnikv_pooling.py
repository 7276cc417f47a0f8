"""``pool_kernel_size`` for OmniKV and DeltaKV: the observer's scores are max-pooled over neighbouring tokens before
the top-k (the reference HF path's optional pooling). The pooled scores against a per-row float64 loop (holes and
padding included), the knob's check, the effect on a selection, and the engine against the HF path for both
methods (the HF path's OmniKV against its loop oracle: ``test_omnikv.py``)."""

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy_with_logits, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM
from sparse_hf.methods import METHODS
from sparse_hf.methods.deltakv import DeltaKVConfig
from sparse_hf.methods.omnikv import OmniKVConfig


def omnikv(num_layers=4, **knobs):
    return METHODS["omnikv"](OmniKVConfig(**dict(dict(full_attn_layers=[0, 2]), **knobs)), num_layers)


def naive_pool(scores: torch.Tensor, present: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per row: the tokens (present slots) in order; a finite score becomes the max over the ``kernel`` tokens
    around it; ``-inf`` stays ``-inf`` (float64)."""
    out = scores.double().clone()
    r = kernel // 2
    for b in range(scores.shape[0]):
        slots = [i for i in range(scores.shape[1]) if present[b, i]]
        for t, i in enumerate(slots):
            if scores[b, i] != float("-inf"):
                out[b, i] = max(float(scores[b, j]) for j in slots[max(0, t - r):t + r + 1])
    return out


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("holes", [False, True])
def test_pooled_scores_equal_a_per_row_loop(kernel, holes):
    torch.manual_seed(kernel)
    B, L = 3, 40
    scores = torch.rand(B, L)
    present = torch.ones(B, L, dtype=torch.bool)
    present[1, :7] = False                                   # left padding
    present[2, 30:] = False                                  # empty slots past the row's length
    if holes:
        present[0, 12:15] = False                            # a second turn's padding between two runs
        present[2, 5:8] = False
    scores = scores.masked_fill(~present, float("-inf"))
    scores[:, :2] = float("-inf")                            # sinks and recent are not candidates
    scores[0, -3:] = float("-inf")
    method = omnikv(pool_kernel_size=kernel)
    got = method.pool_scores(scores, present=present if holes else None)
    want = naive_pool(scores, present if holes else torch.ones_like(present), kernel)
    keep = present                                           # other slots' values are unspecified but stay -inf
    torch.testing.assert_close(got[keep].double(), want[keep])
    assert torch.isneginf(got[~present]).all()


def test_a_neighbour_of_the_strongest_token_is_selected_with_it():
    """One peaked candidate: with pooling its two neighbours come before the next-best scattered tokens."""
    method = omnikv(num_sink_tokens=2, num_recent_tokens=2, num_top_tokens=3, pool_kernel_size=3)
    L = 30
    logits = torch.zeros(1, 2, L)
    logits[0, 0, 15] = 9.0                                   # the needle
    logits[0, 1, [5, 24]] = 4.0                              # two scattered, weaker tokens
    valid = torch.ones(1, L, dtype=torch.bool)
    idx, ok = method.select_decode(logits, valid, valid.sum(-1))
    chosen = set(idx[0][ok[0]].tolist()) - {0, 1, L - 2, L - 1}
    assert chosen == {14, 15, 16}
    plain = omnikv(num_sink_tokens=2, num_recent_tokens=2, num_top_tokens=3, pool_kernel_size=1)
    idx, ok = plain.select_decode(logits, valid, valid.sum(-1))
    assert set(idx[0][ok[0]].tolist()) - {0, 1, L - 2, L - 1} == {5, 15, 24}


def test_deltakv_rebuild_picks_break_pooled_ties_by_token_order_in_any_batch_width():
    """Pooling makes plateaus of equal scores; DeltaKV's rebuild pick (HF path, eager and static) gives a tie to
    the earlier compressed token, so a row picks alike alone or beside a wider row (a plain ``topk``'s tie rule
    may depend on the width); the picks are the first ``k`` of a stable descending sort."""
    method = METHODS["deltakv"](DeltaKVConfig(full_attn_layers=[0, 2], num_top_tokens=4), 4)
    g = torch.Generator().manual_seed(3)
    row = torch.randint(0, 3, (1, 37), generator=g).float()       # few distinct values: many ties
    row = method.pool_scores(row)
    expected = torch.sort(row, dim=-1, descending=True, stable=True).indices[:, :4]
    wide = torch.cat([torch.cat([row, torch.full((1, 64), float("-inf"))], -1),
                      torch.randn(1, 37 + 64, generator=g)], 0)   # the row beside a wider one
    assert torch.equal(method.pick(row, 37, 37), expected)
    assert torch.equal(method.pick(wide, 37 + 64, 37)[:1], expected)
    pick, keep = method.pick_static(wide, 4, torch.tensor([37]), torch.tensor([0, 0]))
    assert torch.equal(pick[:1], expected) and bool(keep.all())


@pytest.mark.parametrize("bad", [0, 2, 4, -1, 2.5, True])
def test_the_kernel_must_be_odd(bad):
    with pytest.raises(ValueError, match="pool_kernel_size"):
        OmniKVConfig(pool_kernel_size=bad)


ENGINE = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)


def test_engine_equals_hf_path_for_pooled_omnikv():
    model = tiny_model("llama", layers=4)
    knobs = dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, full_attn_layers=[0, 2],
                 pool_kernel_size=5)
    prompts = random_prompts((20, 50, 77))
    ours = engine_tokens(LLM(model, sparse_method="omnikv", **ENGINE, **knobs), prompts, 30)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 30, cache_implementation="omnikv",
                                                        cache_config=knobs))
    plain = engine_tokens(LLM(model, sparse_method="omnikv", **ENGINE, **dict(knobs, pool_kernel_size=1)),
                          prompts, 30)
    assert ours != plain, "pooling changed nothing, so the test would prove nothing"


@pytest.mark.parametrize("arch,budget", [("llama", 6), ("qwen3", 0.25)])
def test_engine_equals_hf_path_for_pooled_deltakv(arch, budget):
    model = tiny_model(arch, layers=4)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    knobs = dict(full_attn_layers=[0, 2], num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
                 deltakv_neighbor_count=2, num_top_tokens=budget, pool_kernel_size=3)
    prompts = random_prompts((20, 50, 77))
    ours = engine_tokens(LLM(model, sparse_method="deltakv", compressor=comp, **ENGINE, **knobs), prompts, 30)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 30, cache_implementation="deltakv",
                                                        cache_config=dict(knobs, compressor=comp)))
    plain = engine_tokens(LLM(model, sparse_method="deltakv", compressor=comp, **ENGINE,
                              **dict(knobs, pool_kernel_size=1)), prompts, 30)
    assert ours != plain, "pooling changed nothing, so the test would prove nothing"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["omnikv", "deltakv"])
def test_pooled_selection_under_cuda_graphs_gives_the_eager_tokens(method):
    """HF path on CUDA: decode steps replayed from captured graphs (the pooling, with the sort that packs rows which
    may hold holes, inside the capture) give eager decoding's tokens."""
    from helpers import greedy, left_padded_batch

    model = tiny_model("llama", layers=4).cuda()
    ids, mask = left_padded_batch((50, 38))
    knobs = dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2", pool_kernel_size=5)
    if method == "deltakv":
        torch.manual_seed(0)
        knobs.update(compressor=DeltaKVCompressor.for_model(model.config, kv_compressed_size=16).cuda(),
                     cluster_ratio=0.25, deltakv_neighbor_count=2)
    kw = dict(new_tokens=60, cache_implementation=method, return_dict_in_generate=True)
    eager = greedy(model, ids.cuda(), mask.cuda(), cache_config=dict(knobs, cuda_graph=False), **kw)
    graph = greedy(model, ids.cuda(), mask.cuda(), cache_config=knobs, **kw)
    assert torch.equal(eager.sequences, graph.sequences)
    assert graph.past_key_values.graph_decoder.captures >= 1
