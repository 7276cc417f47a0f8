"""``selection_scope="layer"`` through the whole stack: HF ``generate`` on left-padded batches equals a mask-only
oracle (the full cache with the evicted columns masked) and keeps one token set per layer, and the engine equals
the HF path at the same knobs. The per-row score oracles of both scopes are in ``test_methods_core.py``."""

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy_with_logits, random_prompts
from helpers import assert_same_generation, greedy, left_padded_batch, tiny_model
from sparse_hf.engine import LLM
from test_eviction import _ORACLE_KEEP, SMALL  # noqa: F401  (registers the "oracle_test" attention)

METHODS = ("snapkv", "pyramidkv", "knorm")


def prompt_keep(layer, prompt_len):
    """``[B, Hkv, P]`` bool: which prompt columns a layer of the sparse cache still holds."""
    pos = layer.positions
    prompt_pos = torch.where((pos >= 0) & (pos < prompt_len), pos, prompt_len)
    padded = torch.zeros(pos.shape[0], pos.shape[1], prompt_len + 1, dtype=torch.bool)
    padded.scatter_(2, prompt_pos, True)
    return padded[..., :prompt_len]


@pytest.mark.parametrize("method", METHODS)
def test_layer_scope_generate_matches_mask_oracle_and_shares_tokens(method):
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((56, 41))
    P = ids.shape[1]
    runs = {}
    for scope in ("kv_head", "layer"):
        cfg = dict(SMALL[method], selection_scope=scope)
        out = greedy(model, ids, mask, new_tokens=8, cache_implementation=method, cache_config=cfg,
                     return_dict_in_generate=True, output_logits=True)
        runs[scope] = out
        keeps = [prompt_keep(layer, P) for layer in out.past_key_values.layers]
        if scope == "layer":
            for keep in keeps:
                assert torch.equal(keep, keep[:, :1].expand_as(keep)), "every KV head keeps the same tokens"
                assert keep.sum(-1).max() < mask.sum(-1).max(), "the test budget must really evict"
            for layer_idx, keep in enumerate(keeps):
                _ORACLE_KEEP[layer_idx] = keep
            model.set_attn_implementation("oracle_test")
            try:
                ref = greedy(model, ids, mask, new_tokens=8, return_dict_in_generate=True, output_logits=True)
            finally:
                model.set_attn_implementation("sdpa")
            assert_same_generation(out, ref, atol=2e-5, rtol=1e-4)
    per_head = [prompt_keep(layer, P) for layer in runs["kv_head"].past_key_values.layers]
    assert any(not torch.equal(k, k[:, :1].expand_as(k)) for k in per_head), \
        "kv_head scope should let heads differ here, or the layer-scope check proves nothing"


@pytest.mark.parametrize("method", METHODS)
def test_engine_equals_hf_path_with_layer_scope(method):
    knobs = {"snapkv": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=8, window_size=8),
             "pyramidkv": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=8, window_size=8),
             "knorm": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=0.2)}[method]
    knobs = dict(knobs, selection_scope="layer")
    model = tiny_model("llama", layers=4)
    prompts = random_prompts((20, 50, 77))
    llm = LLM(model, num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16, sparse_method=method, **knobs)
    ours = engine_tokens(llm, prompts, 24)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 24, cache_implementation=method,
                                                        cache_config=knobs))
    llm.pool.check_whole()
