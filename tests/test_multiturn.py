"""A second ``generate`` call continuing from the cache the first one returned (multi-turn chat)."""

import pytest
import torch

from sparse_hf.deltakv import DeltaKVCompressor
from helpers import greedy, left_padded_batch, tiny_model

EXTRA = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(5))


def two_turns(model, **kw):
    ids, mask = left_padded_batch((40, 31))
    out = greedy(model, ids, mask, new_tokens=5, return_dict_in_generate=True, **kw)
    ids2 = torch.cat([out.sequences, EXTRA], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    return greedy(model, ids2, mask2, new_tokens=5, past_key_values=out.past_key_values,
                  return_dict_in_generate=True)


def configs(model, unlimited):
    deltakv = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4,
                   compressor=DeltaKVCompressor.identity_for(model.config))
    if unlimited:
        return {"snapkv": dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8),
                "streamingllm": dict(num_recent_tokens=200),
                "omnikv": dict(num_top_tokens=1.0, full_attn_layers="0,1"),
                "deltakv": dict(deltakv, num_top_tokens=1.0)}
    return {"snapkv": dict(num_top_tokens=4, num_recent_tokens=8, window_size=4),
            "pyramidkv": dict(num_top_tokens=4, num_recent_tokens=8, window_size=4),
            "omnikv": dict(num_top_tokens=4, full_attn_layers="0,1", num_recent_tokens=4),
            "deltakv": dict(deltakv, num_top_tokens=4)}


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "omnikv", "deltakv"])
def test_unlimited_second_turn_matches_dynamic_cache(method):
    model = tiny_model("qwen2", layers=4)
    ref = two_turns(model)
    out = two_turns(model, cache_implementation=method, cache_config=configs(model, True)[method])
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "omnikv", "deltakv"])
def test_small_budget_second_turn(method):
    model = tiny_model("llama", layers=4)
    out = two_turns(model, cache_implementation=method, cache_config=configs(model, False)[method])
    cache = out.past_key_values
    assert out.sequences.shape == (2, 57)
    assert cache.get_seq_length() == 56                 # the logical length runs on across turns
    if method in ("snapkv", "pyramidkv"):                # re-evicted at the end of the second prompt
        assert cache.layers[1].num_slots < 40
