"""Per-method configs: validation, the clear errors of bad input, runtime options, the legacy SparseConfig."""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sparse_hf
from sparse_hf.config import (MethodConfig, RuntimeOptions, SparseConfig, TopTokensConfig, resolve_count,
                              split_runtime_options)
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.methods import METHODS, get_method
from sparse_hf.methods.deltakv import DeltaKVConfig
from sparse_hf.methods.omnikv import OmniKVConfig
from sparse_hf.methods.snapkv import SnapKVConfig
from helpers import greedy, left_padded_batch, tiny_model


def test_defaults_and_parsing():
    cfg = OmniKVConfig.from_dict({"full_attn_layers": "2, 0,1", "num_top_tokens": 0.2})
    assert cfg.full_attn_layers == (0, 1, 2) and cfg.num_top_tokens == 0.2
    assert OmniKVConfig(full_attn_layers=[3, 1]).full_attn_layers == (1, 3)
    assert resolve_count(0.2, 100) == 20 and resolve_count(7, 100) == 7
    assert OmniKVConfig().resolved_full_attn_layers(4) == (0, 1, 2, 3)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_its_own_frozen_config(name):
    cls = get_method(name).config_class
    assert cls is not MethodConfig and cls is not TopTokensConfig and cls.method_name == name
    cfg = cls()
    assert {"num_sink_tokens", "num_recent_tokens"} <= set(cls.knob_names())
    assert not set(cls.knob_names()) & {"cuda_graph", "compressor", "deltakv_path"}   # runtime options
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_sink_tokens = 3
    changed = cfg.replace(num_sink_tokens=3)
    assert changed.num_sink_tokens == 3 and cfg.num_sink_tokens == 8           # a new object, the old one intact
    with pytest.raises(ValueError, match=f"{name}'s knobs are: .*num_recent_tokens"):
        cls.from_dict({"num_top": 3})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_defaults_compress_a_typical_prompt(name):
    """Issue 9 item 11: the demo's 1,047-token prompt (and any typical one) must be compressed by the defaults."""
    cfg = get_method(name).config_class()
    kept = cfg.num_sink_tokens + cfg.num_recent_tokens + resolve_count(getattr(cfg, "num_top_tokens", 0), 1047)
    assert kept < 0.5 * 1047


def test_unused_knob_names_the_methods_knobs():
    with pytest.raises(ValueError, match=r"streamingllm: unknown sparse-hf knob\(s\) \['num_top_tokens'\].*"
                                         r"streamingllm's knobs are: num_sink_tokens, num_recent_tokens"):
        sparse_hf.StreamingLLMCache(tiny_model().config, num_top_tokens=5)
    with pytest.raises(ValueError, match="knorm's knobs are"):
        get_method("knorm").build_config({"window_size": 8})


@pytest.mark.parametrize("cls, knobs, message", [
    (SnapKVConfig, {"num_sink_tokens": -1}, "num_sink_tokens"),
    (SnapKVConfig, {"num_top_tokens": 1.5}, "fraction must lie in"),
    (SnapKVConfig, {"num_top_tokens": 0.0}, "fraction must lie in"),
    (SnapKVConfig, {"num_top_tokens": -3}, "count must be >= 0"),
    (SnapKVConfig, {"num_top_tokens": "lots"}, "expected an int"),
    (SnapKVConfig, {"pool_kernel_size": 4}, "odd"),
    (SnapKVConfig, {"window_size": 0}, "window_size"),
    (OmniKVConfig, {"full_attn_layers": "0,a"}, "comma-separated"),
    (OmniKVConfig, {"chunk_prefill_accel_omnikv": "no"}, "expected True or False"),
    (OmniKVConfig, {"chunk_prefill_accel_omnikv": 1}, "expected True or False"),
    (DeltaKVConfig, {"cluster_ratio": 0}, "cluster_ratio"),
    (DeltaKVConfig, {"kv_quant_bits": 3}, "kv_quant_bits"),
])
def test_impossible_values(cls, knobs, message):
    with pytest.raises(ValueError, match=message) as err:
        cls.from_dict(knobs)
    assert cls.method_name in str(err.value)


def test_runtime_options_are_split_off():
    knobs = {"num_top_tokens": 4, "cuda_graph": True, "deltakv_path": "x"}
    method_knobs, runtime = split_runtime_options(knobs)
    assert method_knobs == {"num_top_tokens": 4} and runtime == RuntimeOptions(cuda_graph=True, deltakv_path="x")
    assert knobs == {"num_top_tokens": 4, "cuda_graph": True, "deltakv_path": "x"}   # the input is untouched
    assert RuntimeOptions().cuda_graph is None                                        # None: automatic
    with pytest.raises(ValueError, match="cuda_graph='yes': expected True or False"):
        split_runtime_options({"cuda_graph": "yes"})
    cache = sparse_hf.SnapKVCache(tiny_model().config, num_recent_tokens=32, cuda_graph=False)
    assert cache.runtime.cuda_graph is False and isinstance(cache.sparse_config, SnapKVConfig)


def test_budget_smaller_than_window():
    model = tiny_model()
    with pytest.raises(ValueError, match="smaller than window_size"):
        sparse_hf.SnapKVCache(model.config, num_recent_tokens=4, window_size=8)


def test_full_attn_layers_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        OmniKVConfig(full_attn_layers="0,9").resolved_full_attn_layers(4)


def test_legacy_sparse_config():
    cfg = SparseConfig(num_top_tokens=0.2, full_attn_layers=[3, 1], cuda_graph=True)
    assert cfg.full_attn_layers == (1, 3) and cfg.num_sink_tokens == 8 and cfg.cuda_graph is True
    assert cfg.to_dict() == {"num_top_tokens": 0.2, "full_attn_layers": (1, 3), "cuda_graph": True}
    with pytest.raises(ValueError, match=r"unknown sparse-hf knob\(s\) \['num_top'\].*num_top_tokens"):
        SparseConfig.from_dict({"num_top": 3})
    with pytest.raises(ValueError, match="expected True or False"):
        SparseConfig(chunk_prefill_accel_omnikv="no")
    with pytest.raises(AttributeError):
        cfg.num_top_tokens = 3


def test_cache_config_objects_and_strings_through_generate():
    """Issue 9 item 7: ``cache_config=SparseConfig(...)`` and method configs work; a string is a clear error."""
    model = tiny_model()
    ids, mask = left_padded_batch()
    knobs = dict(num_top_tokens=4, num_recent_tokens=8, window_size=4)
    ref = greedy(model, ids, mask, cache_implementation="snapkv", cache_config=knobs)
    assert torch.equal(greedy(model, ids, mask, cache_implementation="snapkv", cache_config=SparseConfig(**knobs)), ref)
    assert torch.equal(greedy(model, ids, mask, cache_implementation="snapkv", cache_config=SnapKVConfig(**knobs)), ref)
    with pytest.raises(ValueError, match="is a string; pass a dict of knobs"):
        greedy(model, ids, mask, cache_implementation="snapkv", cache_config="num_top_tokens=4")
    with pytest.raises(ValueError, match="needs a SnapKVConfig, got a OmniKVConfig"):
        sparse_hf.SnapKVCache(model.config, OmniKVConfig())
    with pytest.raises(ValueError, match="needs a SnapKVConfig, got a PyramidKVConfig"):   # a subclass too
        sparse_hf.SnapKVCache(model.config, get_method("pyramidkv").config_class())


def test_deltakv_defaults_from_the_compressor_leave_the_callers_config_alone():
    """Issue 9 item 9: the compressor's training values go into a new config, never the caller's object."""
    model = tiny_model(layers=4)
    comp = DeltaKVCompressor.identity_for(model.config)
    mine = DeltaKVConfig(full_attn_layers="0,1")
    legacy = SparseConfig(full_attn_layers="0,1", compressor=comp)
    cache = sparse_hf.DeltaKVCache(model.config, mine.to_dict() | {"compressor": comp})
    sparse_hf.DeltaKVCache(model.config, legacy)
    assert mine.cluster_ratio is None and mine.deltakv_neighbor_count is None
    assert "cluster_ratio" not in legacy.to_dict()
    assert cache.sparse_config.cluster_ratio == 0.1 and cache.sparse_config.deltakv_neighbor_count == 1
    assert cache.method.config is cache.sparse_config


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
    with pytest.raises(ValueError, match="snapkv's knobs are: .*window_size"):
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


def test_cache_built_from_the_model_or_another_depth():
    """Issue 9 item 7: ``SnapKVCache(model)`` and a cache built for fewer layers give errors that say what to do."""
    model = tiny_model(layers=4)
    with pytest.raises(ValueError, match=r"takes the model's config, not the model: SnapKVCache\(model.config"):
        sparse_hf.SnapKVCache(model)
    ids, mask = left_padded_batch()
    small = sparse_hf.SnapKVCache(tiny_model(layers=2).config, num_recent_tokens=32)
    with pytest.raises(ValueError, match="built for a 2-layer model but got layer 2"):
        greedy(model, ids, mask, past_key_values=small)
