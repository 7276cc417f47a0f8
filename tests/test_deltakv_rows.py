"""DeltaKV per row and per call: each row of a left-padded batch compresses its own tokens (its output and its
compressed counts equal the same prompt's alone), padding does not cost memory, and one model serves threads."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import sparse_hf
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from helpers import greedy, left_padded_batch, tiny_model

KNOBS = dict(full_attn_layers="0,1", num_sink_tokens=4, num_recent_tokens=8, cluster_ratio=0.25,
             deltakv_neighbor_count=2)
NEW = 24


def _random_compressor(model, latent=16, seed=0):
    torch.manual_seed(seed)
    return DeltaKVCompressor.for_model(model.config, kv_compressed_size=latent)


def _run(model, ids, mask, cfg, new=NEW):
    return greedy(model, ids, mask, new_tokens=new, cache_implementation="deltakv", cache_config=cfg,
                  output_logits=True, return_dict_in_generate=True)


def _compressed(cache) -> list[list[int]]:
    """Compressed tokens per layer (DeltaKV layers) and row."""
    return [layer.compressed_per_row() for layer in cache.layers if isinstance(layer, DeltaKVLayer)]


@pytest.mark.parametrize("arch,budget", [("llama", 6), ("qwen3", 6), ("qwen2", 0.25)])
def test_a_prompt_alone_equals_the_same_prompt_in_a_padded_batch(arch, budget):
    model = tiny_model(arch, layers=4)
    lengths = (120, 50, 3)          # the last row starts compressing only during decode
    ids, mask = left_padded_batch(lengths)
    cfg = dict(KNOBS, compressor=_random_compressor(model), num_top_tokens=budget)
    batch = _run(model, ids, mask, cfg)
    batch_counts = _compressed(batch.past_key_values)
    for row, n in enumerate(lengths):
        alone = _run(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:], cfg)
        assert torch.equal(batch.sequences[row, -NEW:], alone.sequences[0, -NEW:]), f"row {row}"
        for a, b in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)
        alone_counts = _compressed(alone.past_key_values)
        assert [layer[row] for layer in batch_counts] == [layer[0] for layer in alone_counts], f"row {row}"
        assert alone_counts[0][0] > 0                           # every row did compress
        kept_b = sparse_hf.kv_usage(batch.past_key_values).kept_tokens
        kept_a = sparse_hf.kv_usage(alone.past_key_values).kept_tokens
        assert [k[row] for k in kept_b] == [k[0] for k in kept_a]


def test_a_long_and_a_tiny_prompt_compress_the_long_one_and_save_memory():
    # the (600, 2) case of the bug report at a CPU-friendly size: padding must not stop the long row compressing
    model = tiny_model("qwen2", layers=6)
    ids, mask = left_padded_batch((300, 2))
    cfg = dict(KNOBS, compressor=_random_compressor(model, latent=8), num_top_tokens=0.1, cluster_ratio=0.1)
    out = _run(model, ids, mask, cfg, new=4)
    alone = _run(model, ids[:1], mask[:1], cfg, new=4)
    assert _compressed(out.past_key_values) == [[c[0], 0] for c in _compressed(alone.past_key_values)]
    assert min(c[0] for c in _compressed(out.past_key_values)) >= 300 - 4 - 2 * 8
    usage = sparse_hf.kv_usage(out.past_key_values)
    assert usage.bytes < 0.7 * usage.full_bytes, (usage.bytes, usage.full_bytes)   # was 1.93x before per-row
    per_layer_full = usage.full_bytes / len(out.past_key_values.layers)
    for layer in out.past_key_values.layers[2:]:                        # the compressed layers
        # the shared scratch (K/V of the tokens a decode step rebuilds, ~ the budget, once for all layers) is the
        # working set of a static decode step: counted in the usage above, bounded by the budget here
        parts = layer.bytes_by_part()
        scratch = parts["shared scratch (raw copy + rebuilt tokens of a decode step; one for all layers)"]
        assert layer.allocated_bytes() - scratch < 0.4 * per_layer_full
        assert 0 < layer.scratch <= int(0.1 * (layer.seen + KNOBS["num_recent_tokens"]))


def test_threads_sharing_one_qwen3_model_get_their_own_outputs():
    model = tiny_model("qwen3", layers=4)
    cfg = dict(KNOBS, compressor=_random_compressor(model), num_top_tokens=6)
    batches = [left_padded_batch((40 + 5 * i, 30), seed=i) for i in range(8)]
    expected = [_run(model, ids, mask, cfg, new=12).sequences for ids, mask in batches]   # sequential
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda b: _run(model, b[0], b[1], cfg, new=12).sequences, batches))
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"call {i}"


def test_beam_search_over_rows_with_different_counts_matches_the_full_cache():
    model = tiny_model("qwen3", layers=4)
    ids, mask = left_padded_batch((48, 20))
    cfg = dict(KNOBS, num_sink_tokens=2, num_recent_tokens=4, compressor=DeltaKVCompressor.identity_for(model.config),
               num_top_tokens=1.0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
    out = model.generate(**kw, cache_implementation="deltakv", cache_config=cfg, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**kw))
    counts = _compressed(out.past_key_values)[0]
    assert len(set(counts)) > 1                            # the beams of the two prompts compressed differently


def test_a_finished_call_leaves_its_cache_to_the_garbage_collector():
    import gc
    import weakref

    model = tiny_model("qwen3", layers=4)
    ids, mask = left_padded_batch((30, 20))
    out = _run(model, ids, mask, dict(KNOBS, compressor=_random_compressor(model), num_top_tokens=6), new=4)
    ref = weakref.ref(out.past_key_values)
    del out
    gc.collect()
    assert ref() is None                  # nothing (hooks, thread-local hand-over) keeps the cache alive
