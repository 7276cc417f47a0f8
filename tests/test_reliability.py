"""Regression tests for issue 9's silent wrong results in the HF glue (one section per item).

References: unchunked generation, the same prompt alone, a fresh model, plain ``generate``."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import sparse_hf
from helpers import ARCHS, VOCAB, greedy, left_padded_batch, tiny_model
from test_eviction import UNLIMITED as EVICTION_UNLIMITED

SMALL = {
    "streamingllm": dict(num_sink_tokens=2, num_recent_tokens=9),
    "snapkv": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8, window_size=4),
    "pyramidkv": dict(num_sink_tokens=2, num_top_tokens=8, num_recent_tokens=8, window_size=4),
    "knorm": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8),
    "omnikv": dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2"),
}
# test_eviction's budgets that keep everything, with a window long enough for 300 new tokens, and OmniKV's
UNLIMITED = dict(EVICTION_UNLIMITED, streamingllm=dict(num_sink_tokens=4, num_recent_tokens=400),
                 omnikv=dict(num_top_tokens=1.0, full_attn_layers="0,1"))


def _deltakv_config(model):
    from sparse_hf.deltakv import DeltaKVCompressor

    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    return dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
                deltakv_neighbor_count=2, num_top_tokens=6, compressor=comp)


def _kept(cache):
    return sparse_hf.kv_usage(cache).kept_tokens


# -- item 1: a one-token last prefill chunk is still prefill -------------------------------------------------------
@pytest.mark.parametrize("method", sorted(SMALL))
@pytest.mark.parametrize("lengths", [(65,), (65, 50)])
def test_chunked_prefill_with_one_token_last_chunk_equals_unchunked(method, lengths):
    model = tiny_model("qwen2", layers=3)
    ids, mask = left_padded_batch(lengths)
    kw = dict(new_tokens=8, cache_implementation=method, cache_config=SMALL[method], return_dict_in_generate=True)
    whole = greedy(model, ids, mask, **kw)
    for chunk in (16, 64):                     # 65 = 4 * 16 + 1 and 64 + 1: the last chunk is one token
        chunked = greedy(model, ids, mask, prefill_chunk_size=chunk, **kw)
        assert torch.equal(whole.sequences, chunked.sequences), chunk
        assert _kept(whole.past_key_values) == _kept(chunked.past_key_values), chunk
    if method in ("snapkv", "pyramidkv", "knorm", "streamingllm"):
        assert max(max(row) for row in _kept(whole.past_key_values)) < 40     # evicted, not the whole prompt


# -- item 4: a prompt alone == the same prompt in a left-padded batch ---------------------------------------------
BATCH_METHODS = dict(SMALL, snapkv=dict(SMALL["snapkv"], pool_kernel_size=7),
                     pyramidkv=dict(SMALL["pyramidkv"], pool_kernel_size=7))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(BATCH_METHODS) + ["deltakv"])
def test_prompt_alone_equals_prompt_in_padded_batch(arch, method):
    if method == "deltakv" and arch != "qwen3":
        pytest.skip("one architecture is enough for the slow DeltaKV path")
    model = tiny_model(arch, layers=3)
    cfg = _deltakv_config(model) if method == "deltakv" else BATCH_METHODS[method]
    ids, mask = left_padded_batch((70, 41, 23, 7), seed=3)   # 7: shorter than the window
    kw = dict(new_tokens=24, cache_implementation=method, cache_config=cfg)
    batched = greedy(model, ids, mask, **kw)
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()].unsqueeze(0)
        alone = greedy(model, real, torch.ones_like(real), **kw)
        assert torch.equal(alone[0, real.shape[1]:], batched[row, ids.shape[1]:]), row


def test_streamingllm_trims_each_row_on_its_own_schedule():
    from sparse_hf.methods import get_method

    cls = get_method("streamingllm")
    method = cls(cls.build_config(num_sink_tokens=2, num_recent_tokens=8)[0], 1)
    limit = method.decode_slot_limit                              # 2 + 8 + 8
    valid = torch.ones(2, 1, limit, dtype=torch.bool)
    valid[1, :, :5] = False                                       # row 1 holds 5 tokens fewer: not due yet
    idx, ok = method.decode_keep(0, valid)
    assert ok[0].sum() == 10                                      # row 0: back to sink + recent
    assert ok[1].sum() == limit - 5                               # row 1: keeps every token it has
    assert torch.equal(idx[1][ok[1]], torch.arange(5, limit))


# -- item 5: a sparse run leaves plain calls as they were ----------------------------------------------------------
def test_plain_generate_after_sparse_run_on_eager_model_is_unchanged():
    ids, mask = left_padded_batch((30, 22))
    kw = dict(new_tokens=4, output_attentions=True, output_logits=True, return_dict_in_generate=True)

    fresh = tiny_model("llama")
    fresh.set_attn_implementation("eager")
    ref = greedy(fresh, ids, mask, **kw)

    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    greedy(model, ids, mask, new_tokens=4, cache_implementation="snapkv", cache_config=SMALL["snapkv"])
    out = greedy(model, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.attentions) == len(ref.attentions) > 0
    for step_out, step_ref in zip(out.attentions, ref.attentions):
        for a, b in zip(step_out, step_ref):
            assert a is not None and b is not None
            torch.testing.assert_close(a, b)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b)
    # direct calls with a prepared model keep working, with and without a sparse cache
    sparse_hf.prepare_model(model)
    plain = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    expect = fresh(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(plain.logits, expect.logits)
    torch.testing.assert_close(plain.attentions[0], expect.attentions[0])
    cache = sparse_hf.SnapKVCache(model.config, **UNLIMITED["snapkv"])
    sparse = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    torch.testing.assert_close(sparse.logits, expect.logits, atol=1e-5, rtol=1e-5)


# -- item 2: no room reserved for max_new_tokens that never come ---------------------------------------------------
class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("method", sorted(SMALL))
def test_huge_max_new_tokens_with_early_stop_allocates_like_a_plain_cache(method):
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch((200, 150))
    stop = StoppingCriteriaList([StopAfter(ids.shape[1] + 16)])
    plain = greedy(model, ids, mask, new_tokens=40_000, stopping_criteria=stop, return_dict_in_generate=True)
    ours = greedy(model, ids, mask, new_tokens=40_000, stopping_criteria=stop, return_dict_in_generate=True,
                  cache_implementation=method, cache_config=SMALL[method])
    assert ours.sequences.shape[1] == ids.shape[1] + 16
    full = sparse_hf.kv_usage(plain.past_key_values).bytes
    usage = sparse_hf.kv_usage(ours.past_key_values)
    assert usage.bytes <= 1.5 * full, (usage.bytes, full)
    if method == "streamingllm":   # a bounded window: never more slots than it trims back from
        limit = SMALL[method]["num_sink_tokens"] + SMALL[method]["num_recent_tokens"] + 8
        assert all(layer.capacity <= limit for layer in ours.past_key_values.layers)


@pytest.mark.parametrize("method", sorted(UNLIMITED))
def test_generation_past_the_first_reservation_equals_reference(method):
    model = tiny_model("qwen2", layers=2)
    ids, mask = left_padded_batch((30, 21))
    ref = greedy(model, ids, mask, new_tokens=300)
    out = greedy(model, ids, mask, new_tokens=300, cache_implementation=method, cache_config=UNLIMITED[method],
                 return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    layer = out.past_key_values.layers[1]
    assert layer.capacity >= layer.num_slots >= 300    # grew past the first reservation (64)


# -- item 10: assisted and prompt-lookup generation ---------------------------------------------------------------
def _repetitive_prompt():
    ids, _ = left_padded_batch((30,))
    ids = torch.cat([ids, ids[:, 5:15], ids[:, 5:15]], 1)     # repeats: prompt lookup finds drafts
    return ids, torch.ones_like(ids)


ROLLBACK = {
    "omnikv-small": ("omnikv", SMALL["omnikv"]),
    "omnikv-unlimited": ("omnikv", UNLIMITED["omnikv"]),
    "snapkv-unlimited": ("snapkv", UNLIMITED["snapkv"]),
    "streamingllm-unlimited": ("streamingllm", UNLIMITED["streamingllm"]),
}


@pytest.mark.parametrize("case", sorted(ROLLBACK))
@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant"])
def test_assisted_generation_equals_reference_where_the_cache_can_roll_back(case, drafts):
    method, cfg = ROLLBACK[case]
    model = tiny_model("llama", layers=3)
    ids, mask = _repetitive_prompt()
    kw = dict(new_tokens=12, cache_implementation=method, cache_config=cfg)
    extra = (dict(prompt_lookup_num_tokens=3) if drafts == "prompt_lookup"
             else dict(assistant_model=tiny_model("llama", layers=3, seed=1)))   # 3 layers: 5.17 gives it our cache too
    ref = greedy(model, ids, mask, **kw)
    out = greedy(model, ids, mask, **kw, **extra)
    assert torch.equal(out, ref)
    if "unlimited" in case:
        assert torch.equal(out, greedy(model, ids, mask, new_tokens=12))


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "deltakv"])
def test_assisted_generation_with_an_evicting_cache_raises_our_error(method):
    model = tiny_model("qwen3", layers=3)
    ids, mask = _repetitive_prompt()
    cfg = _deltakv_config(model) if method == "deltakv" else SMALL[method]
    with pytest.raises(sparse_hf.CacheCropError, match="assistant_model / prompt_lookup_num_tokens"):
        greedy(model, ids, mask, new_tokens=12, cache_implementation=method, cache_config=cfg,
               prompt_lookup_num_tokens=3)


def test_crop_before_eviction_restores_the_cache():
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch((20, 14))
    sparse_hf.prepare_model(model)
    cache = sparse_hf.build_cache("omnikv", model.config, UNLIMITED["omnikv"])
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    before = [(layer.num_slots, layer.positions.clone()) for layer in cache.layers]
    extra = torch.randint(1, VOCAB, (2, 3))
    model(input_ids=extra, attention_mask=torch.cat([mask, torch.ones_like(extra)], 1), past_key_values=cache)
    cache.crop(-3)
    for layer, (slots, positions) in zip(cache.layers, before):
        assert layer.num_slots == layer.seen == slots
        assert torch.equal(layer.positions, positions)
        assert int(layer.n_dev) == slots and int(layer.seen_dev) == slots


# -- item 14: CUDA graphs by default where safe (the decision; tests/test_gpu_hf.py runs the graphs) --------------
def test_cuda_graph_decision():
    from sparse_hf.hf.integration import graph_blocker, wants_cuda_graph

    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch((20, 14))
    step = dict(input_ids=torch.ones(2, 1, dtype=torch.long))

    def cache_after(method, cfg, **kw):
        out = greedy(model, ids, mask, new_tokens=2, cache_implementation=method, cache_config=cfg,
                     return_dict_in_generate=True, **kw)
        return out.past_key_values

    # the knob: not given (or True) = automatic, False = never; a SparseConfig object's value is taken as it is
    assert sparse_hf.build_cache("snapkv", model.config).cuda_graph is None
    assert sparse_hf.build_cache("snapkv", model.config, dict(cuda_graph=True)).cuda_graph is True
    assert sparse_hf.build_cache("snapkv", model.config, dict(cuda_graph=False)).cuda_graph is False

    for method in ("snapkv", "streamingllm", "pyramidkv", "knorm", "omnikv"):
        cache = cache_after(method, SMALL[method])
        # everything safe: only the device stops it on this CPU machine
        assert graph_blocker(cache, step) == "not on CUDA"
        assert not wants_cuda_graph(cache, step)
        assert graph_blocker(cache, dict(step, output_attentions=True)).startswith("output_attentions")
        assert graph_blocker(cache, dict(step, output_hidden_states=True)).startswith("output_attentions")
        assert graph_blocker(cache, dict(input_ids=torch.ones(2, 3, dtype=torch.long))) == "not a one-token decode step"
        assert graph_blocker(cache, dict(inputs_embeds=torch.ones(2, 1, 64))) == "inputs other than input_ids=..."
    assert graph_blocker(cache_after("snapkv", dict(SMALL["snapkv"], cuda_graph=False)), step) == "cuda_graph=False"
    assert graph_blocker(cache_after("snapkv", SMALL["snapkv"], num_beams=2), step) == "beam search"
    # DeltaKV: graphs by default, as the other methods, flush steps included (their flush runs after the replay;
    # tests/test_deltakv_static.py and test_deltakv_graph_replay.py check the steps)
    for knobs in (_deltakv_config(model), dict(_deltakv_config(model), cuda_graph=True)):
        assert graph_blocker(cache_after("deltakv", knobs), step) == "not on CUDA"
    assert graph_blocker(cache_after("deltakv", dict(_deltakv_config(model), cuda_graph=False)), step) == \
        "cuda_graph=False"
    fresh = sparse_hf.build_cache("snapkv", model.config)
    assert graph_blocker(fresh, step) == "the prompt is not complete"
    assert graph_blocker(None, step) == "not a sparse-hf cache"
