"""Minimal reproductions of what the differential fuzzer (``fuzz_differential.py``) found, each a regression test
that failed before its fix."""

import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy_with_logits, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM


def test_deltakv_layerwise_prefill_then_offloaded_flush_during_decode():
    """A layer-wise DeltaKV prompt compresses inside the prefill's inference mode, so its offloaded latent buffers
    were inference tensors; the first flush during decode wrote into them in place outside inference mode and
    raised ``RuntimeError: Inplace update to inference tensor outside InferenceMode`` (fuzz seed 9011). Now every
    flush runs in inference mode, and the tokens equal the HF path's."""
    model = tiny_model("llama", layers=3)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=8)
    knobs = dict(full_attn_layers=[0], num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=8,
                 cluster_ratio=0.5, offload_latents=True)
    prompt = random_prompts((30,), seed=1)[0]
    llm = LLM(model, num_kv_slots=512, max_model_len=64, sparse_method="deltakv", deltakv_prefill="layerwise",
              compressor=comp, **knobs)
    got = engine_tokens(llm, [prompt], 12)[0]                 # the buffer refills to 2 * 4 within 12 steps: a flush
    assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 12, cache_implementation="deltakv",
                                                    cache_config=dict(knobs, compressor=comp)))
    llm.pool.check_whole()


def test_snapkv_second_turn_of_a_batch_equals_the_row_alone():
    """A second turn continues a batched cache whose rows hold holes (a short row's first-turn slots, then empty
    slots the long row's eviction left, then its new tokens). SnapKV max-pooled its scores along the slots, so a
    token next to a hole lost its pooled neighbours and the row kept other tokens than alone (fuzz seed 700251,
    PyramidKV). Pooling now runs over the row's tokens in order."""
    from fuzz_differential import hf_two_turns

    model = tiny_model("llama", layers=2)
    rows = random_prompts((32, 4), seed=0)
    extra = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(cache_implementation="snapkv", cache_config=dict(num_sink_tokens=2, num_recent_tokens=4, window_size=4,
                                                               pool_kernel_size=7, num_top_tokens=0.1))
    batched, _ = hf_two_turns(model, rows, 5, extra, 6, **kw)
    for row in range(2):
        alone, logits = hf_two_turns(model, [rows[row]], 5, extra[row:row + 1], 6, **kw)
        assert_greedy_equal(batched[row], alone[0], logits[:, 0])


def test_max_pool_over_present_slots_ignores_holes():
    """``max_pool_scores(..., present)`` pools each row over its present slots in order, as if the holes were not
    there; without ``present`` (or without holes) it is the plain max-pool."""
    from sparse_hf.methods.selection import max_pool_scores

    torch.manual_seed(0)
    dense = torch.rand(2, 3, 9)
    holes = torch.tensor([1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)     # 9 present of 13 slots
    spread = torch.zeros(2, 3, 13).masked_scatter(holes.expand(2, 3, 13), dense)
    pooled = max_pool_scores(spread, 5, present=holes)
    torch.testing.assert_close(pooled[..., holes], max_pool_scores(dense, 5), rtol=0, atol=0)
    torch.testing.assert_close(max_pool_scores(dense, 5, present=torch.ones(9, dtype=torch.bool)),
                               max_pool_scores(dense, 5), rtol=0, atol=0)
