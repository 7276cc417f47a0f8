"""SparseConfig validation and the clear errors of bad input."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sparse_hf
from sparse_hf.config import SparseConfig, resolve_count
from helpers import greedy, left_padded_batch, tiny_model


def test_defaults_and_parsing():
    cfg = SparseConfig.from_dict({"full_attn_layers": "2, 0,1", "num_top_tokens": 0.2})
    assert cfg.full_attn_layers == (0, 1, 2)
    assert SparseConfig(full_attn_layers=[3, 1]).full_attn_layers == (1, 3)
    assert resolve_count(0.2, 100) == 20 and resolve_count(7, 100) == 7
    assert SparseConfig().resolved_full_attn_layers(4) == (0, 1, 2, 3)


def test_unknown_knob_lists_valid_knobs():
    with pytest.raises(ValueError, match=r"unknown sparse-hf knob\(s\) \['num_top'\].*num_top_tokens"):
        SparseConfig.from_dict({"num_top": 3})


@pytest.mark.parametrize("knobs, message", [
    ({"num_sink_tokens": -1}, "num_sink_tokens"),
    ({"num_top_tokens": 1.5}, "fraction must lie in"),
    ({"num_top_tokens": 0.0}, "fraction must lie in"),
    ({"num_top_tokens": -3}, "count must be >= 0"),
    ({"num_top_tokens": "lots"}, "expected an int"),
    ({"pool_kernel_size": 4}, "odd"),
    ({"full_attn_layers": "0,a"}, "comma-separated"),
    ({"cluster_ratio": 0}, "cluster_ratio"),
])
def test_impossible_values(knobs, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig.from_dict(knobs)


def test_budget_smaller_than_window():
    model = tiny_model()
    with pytest.raises(ValueError, match="smaller than window_size"):
        sparse_hf.SnapKVCache(model.config, num_recent_tokens=4, window_size=8)


def test_full_attn_layers_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        SparseConfig(full_attn_layers="0,9").resolved_full_attn_layers(4)


def test_unknown_method_names_the_valid_ones():
    model = tiny_model()
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="snapkv"):
        greedy(model, ids, mask, cache_implementation="snapkvv")
    with pytest.raises(ValueError, match="valid methods are: .*streamingllm"):
        sparse_hf.build_cache("nope", model.config)
    with pytest.raises(ValueError, match="valid methods are"):
        sparse_hf.get_method("nope")


def test_unknown_knob_through_generate():
    model = tiny_model()
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="valid knobs are"):
        greedy(model, ids, mask, cache_implementation="snapkv", cache_config={"window": 3})


def test_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="supports the llama, qwen2, qwen3"):
        sparse_hf.SnapKVCache(gpt2.config)
    with pytest.raises(ValueError, match="supports the llama"):
        gpt2.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                      cache_implementation="streamingllm")


def test_sliding_window_layers_rejected():
    model = tiny_model("qwen2")
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="sliding-window"):
        sparse_hf.SnapKVCache(model.config)


def test_cache_object_and_implementation_together():
    model = tiny_model()
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="not both|Please use only one"):
        greedy(model, ids, mask, cache_implementation="snapkv",
               past_key_values=sparse_hf.SnapKVCache(model.config, num_recent_tokens=32))
