"""A second ``generate`` call continuing from the cache the first one returned (multi-turn chat)."""

import pytest
import torch
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.methods import METHODS
from helpers import greedy, left_padded_batch, tiny_model
from test_h2o import RECENT, SINK, TOP, H2OOracle, oracle_model

EXTRA = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(5))


def two_turns(model, output_logits=False, **kw):
    """Turn 1 on a left-padded batch, then turn 2 (turn 1's output + 7 new tokens) from the returned cache.
    With ``output_logits`` the logits of both turns are returned (``.logits``: turn 1's, then turn 2's)."""
    ids, mask = left_padded_batch((40, 31))
    out = greedy(model, ids, mask, new_tokens=5, return_dict_in_generate=True, output_logits=output_logits, **kw)
    ids2 = torch.cat([out.sequences, EXTRA], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    out2 = greedy(model, ids2, mask2, new_tokens=5, past_key_values=out.past_key_values,
                  return_dict_in_generate=True, output_logits=output_logits)
    if output_logits:
        out2.logits = tuple(out.logits) + tuple(out2.logits)
    return out2


def configs(model, unlimited):
    deltakv = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4,
                   compressor=DeltaKVCompressor.identity_for(model.config))
    if unlimited:
        return {"snapkv": dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8),
                "pyramidkv": dict(num_top_tokens=10_000, num_recent_tokens=16, window_size=8),
                "knorm": dict(num_top_tokens=1.0, num_recent_tokens=16),
                "h2o": dict(num_top_tokens=1.0, num_recent_tokens=16),
                "streamingllm": dict(num_recent_tokens=200),
                "omnikv": dict(num_top_tokens=1.0, full_attn_layers="0,1"),
                "deltakv": dict(deltakv, num_top_tokens=1.0)}
    return {"snapkv": dict(num_top_tokens=4, num_recent_tokens=8, window_size=4),
            "pyramidkv": dict(num_top_tokens=4, num_recent_tokens=8, window_size=4),
            "omnikv": dict(num_top_tokens=4, full_attn_layers="0,1", num_recent_tokens=4),
            "deltakv": dict(deltakv, num_top_tokens=4)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unlimited_second_turn_matches_dynamic_cache(method):
    """Every registered method (a new one must add its unlimited knobs above) continues a conversation exactly
    like ``DynamicCache`` when its budget covers everything: tokens and logits of both turns."""
    model = tiny_model("qwen2", layers=4)
    ref = two_turns(model, output_logits=True)
    out = two_turns(model, cache_implementation=method, cache_config=configs(model, True)[method], output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_h2o_second_turn_matches_its_oracle():
    """A small budget against a reference: the second turn continues from the evicted cache exactly as the
    independent H2O oracle (a full cache whose attention masks the tokens a naive loop evicted) does."""
    model = tiny_model("llama", layers=3).double()
    knobs = dict(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=TOP)
    out = two_turns(model, cache_implementation="h2o", cache_config=knobs)

    ids, _ = left_padded_batch((40, 31))
    oracle = H2OOracle(ids.shape[1], TOP)
    ref = two_turns(oracle_model("llama", oracle))
    assert torch.equal(out.sequences, ref.sequences)
    cache = out.past_key_values
    assert cache.get_seq_length() == ref.past_key_values.get_seq_length()
    for i, layer in enumerate(cache.layers):
        for b in range(2):
            for h in range(layer.positions.shape[1]):
                pos = layer.positions[b, h]
                assert set(pos[pos >= 0].tolist()) == oracle.kept[i][b][h], (i, b, h)
                assert len(oracle.kept[i][b][h]) == SINK + RECENT + TOP


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "omnikv", "deltakv"])
def test_small_budget_second_turn(method):
    model = tiny_model("llama", layers=4)
    out = two_turns(model, cache_implementation=method, cache_config=configs(model, False)[method])
    cache = out.past_key_values
    assert out.sequences.shape == (2, 57)
    assert cache.get_seq_length() == 56                 # the logical length runs on across turns
    if method in ("snapkv", "pyramidkv"):                # re-evicted at the end of the second prompt
        assert cache.layers[1].num_slots < 40
