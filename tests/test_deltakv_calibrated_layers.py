"""A compressor that records its calibrated filter layers (``DeltaKVCompressorConfig.full_attn_layers``, written by
``sparse-hf calibrate --deltakv-path ... --save-compressor``) serves with them by default, on the HF path and in the
engine alike; the caller's ``full_attn_layers`` wins; the layers survive save/load and show in the model card; a
record that could not serve (no layer 0, out of range) is refused when it is made.

The reference for "serves with them" is the same compressor without the record and the layers passed by hand:
greedy tokens must be equal."""

import copy

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy, hf_greedy_with_logits, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.deltakv.model_card import NOT_CALIBRATED
from sparse_hf.engine import LLM
from sparse_hf.hf import build_cache

CALIBRATED = [0, 2, 4, 5]
KNOBS = dict(num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25, deltakv_neighbor_count=2,
             num_top_tokens=0.25)
ENGINE = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)


def compressors(model, tmp_path):
    """``(plain, calibrated)``: the same random weights, the second saved with ``CALIBRATED`` and loaded back."""
    torch.manual_seed(0)
    plain = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    copy.deepcopy(plain).save_pretrained(tmp_path / "calibrated", full_attn_layers=CALIBRATED)
    return plain, DeltaKVCompressor.from_pretrained(tmp_path / "calibrated")


def test_the_record_survives_save_and_load_and_is_in_the_card(tmp_path):
    model = tiny_model("qwen2", layers=7)
    plain, calibrated = compressors(model, tmp_path)
    assert calibrated.config.full_attn_layers == CALIBRATED
    assert calibrated.projections.serving_defaults()["full_attn_layers"] == tuple(CALIBRATED)
    assert "| filter layers (serving default) | 0, 2, 4, 5 |" in (tmp_path / "calibrated" / "README.md").read_text()
    plain.save_pretrained(tmp_path / "plain")
    assert "full_attn_layers" not in DeltaKVCompressor.from_pretrained(tmp_path / "plain").projections.serving_defaults()
    assert NOT_CALIBRATED in (tmp_path / "plain" / "README.md").read_text()


def test_hf_path_serves_with_the_recorded_layers(tmp_path):
    model = tiny_model("qwen2", layers=7)
    plain, calibrated = compressors(model, tmp_path)
    cache = build_cache("deltakv", model.config, dict(KNOBS, compressor=calibrated))
    assert list(cache.method.full_layers) == CALIBRATED
    mine = build_cache("deltakv", model.config, dict(KNOBS, compressor=calibrated, full_attn_layers=[0, 1, 3, 6]))
    assert list(mine.method.full_layers) == [0, 1, 3, 6]                 # the caller's layers win
    for prompt in random_prompts((40, 77)):
        got = hf_greedy(model, prompt, 20, cache_implementation="deltakv", cache_config=dict(KNOBS, compressor=calibrated))
        by_hand = hf_greedy(model, prompt, 20, cache_implementation="deltakv",
                            cache_config=dict(KNOBS, compressor=plain, full_attn_layers=CALIBRATED))
        assert got == by_hand


def test_engine_serves_with_the_recorded_layers(tmp_path):
    model = tiny_model("qwen2", layers=7)
    plain, calibrated = compressors(model, tmp_path)
    prompts = random_prompts((40, 77))
    llm = LLM(model, sparse_method="deltakv", compressor=calibrated, **ENGINE, **KNOBS)
    assert list(llm.method.full_layers) == CALIBRATED
    for prompt, got in zip(prompts, engine_tokens(llm, prompts, 20)):
        assert_greedy_equal(got, *hf_greedy_with_logits(
            model, prompt, 20, cache_implementation="deltakv",
            cache_config=dict(KNOBS, compressor=plain, full_attn_layers=CALIBRATED)))
    llm.pool.check_whole()
    llm.close()


def test_recorded_layers_may_leave_uncompressed_layers_without_weights(tmp_path):
    """A compressor with weights only for the layers its record compresses serves with the record; layers the
    caller would compress without weights are a clear error (checked after the defaults are applied)."""
    model = tiny_model("llama", layers=6)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16, compressed_layers=[1, 3, 5])
    comp.save_pretrained(tmp_path / "c", full_attn_layers=[0, 2, 4])
    comp = DeltaKVCompressor.from_pretrained(tmp_path / "c")
    assert list(build_cache("deltakv", model.config, dict(KNOBS, compressor=comp)).method.full_layers) == [0, 2, 4]
    with pytest.raises(ValueError, match=r"no weights for layers \[2, 4\]"):
        build_cache("deltakv", model.config, dict(KNOBS, compressor=comp, full_attn_layers=[0, 1]))


@pytest.mark.parametrize("layers,message", [([2, 4], "must include layer 0"), ([0, 9], r"out of range")])
def test_a_record_that_cannot_serve_is_refused(tmp_path, layers, message):
    model = tiny_model("llama", layers=6)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    with pytest.raises(ValueError, match=message):
        comp.save_pretrained(tmp_path / "c", full_attn_layers=layers)


def test_the_eval_records_the_layers_that_served_and_will_not_resume_other_ones(tmp_path):
    """``budget_to_cache_config`` writes a compressor's recorded layers into the knobs (so each prediction says what
    served), and predictions made with other layers are refused on resume, not mixed in."""
    from sparse_hf.eval.runner import _check_same_knobs, budget_to_cache_config

    model = tiny_model("qwen2", layers=7)
    compressors(model, tmp_path)
    path = str(tmp_path / "calibrated")
    config = budget_to_cache_config("deltakv", 0.25, 400, {"deltakv_path": path})
    assert config["full_attn_layers"] == CALIBRATED
    assert budget_to_cache_config("deltakv", 0.25, 400, {"deltakv_path": path, "full_attn_layers": [0, 1]})[
        "full_attn_layers"] == [0, 1]
    old = dict(config, full_attn_layers=[0, 1, 2, 3])      # made before the compressor recorded its layers
    record = {"method": "deltakv", "budget": 0.25, "prompt_tokens": 400, "cache_config": old}
    with pytest.raises(ValueError, match="use another output directory"):
        _check_same_knobs([record], {"deltakv_path": path}, "predictions.jsonl")
    _check_same_knobs([dict(record, cache_config=config)], {"deltakv_path": path}, "predictions.jsonl")
