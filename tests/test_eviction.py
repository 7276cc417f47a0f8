"""The eviction family (StreamingLLM, SnapKV, PyramidKV) on the HF path, against references:
vanilla ``DynamicCache`` generation, and a mask-only oracle (the full cache with the evicted columns masked)."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparse_hf
from helpers import ARCHS, assert_same_generation, greedy, left_padded_batch, tiny_model

UNLIMITED = {
    "streamingllm": dict(num_sink_tokens=4, num_recent_tokens=200),
    "snapkv": dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8),
    "pyramidkv": dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8, pyramid_start_ratio=1.0,
                      pyramid_least_ratio=1.0),
    "knorm": dict(num_top_tokens=1.0, num_recent_tokens=16),
}
SMALL = {
    "streamingllm": dict(num_sink_tokens=2, num_recent_tokens=9),
    "snapkv": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8, window_size=4, pool_kernel_size=3),
    "pyramidkv": dict(num_sink_tokens=2, num_top_tokens=8, num_recent_tokens=8, window_size=4, pool_kernel_size=3),
    "knorm": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(UNLIMITED))
def test_unlimited_budget_matches_dynamic_cache(arch, method):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    ref = greedy(model, ids, mask, new_tokens=12)
    out = greedy(model, ids, mask, new_tokens=12, cache_implementation=method, cache_config=UNLIMITED[method])
    assert torch.equal(out, ref)


# -- mask-only oracle ----------------------------------------------------------------------------------------
_ORACLE_KEEP: dict[int, torch.Tensor] = {}


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Full cache; at decode, columns of the prompt that the sparse cache evicted are masked."""
    if query.shape[2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    keep = _ORACLE_KEEP[module.layer_idx]                     # [B, Hkv, prompt_len]
    B, Hkv, P = keep.shape
    L = key.shape[2]
    allowed = torch.ones(B, Hkv, 1, L, dtype=torch.bool)
    allowed[..., :P] = keep.unsqueeze(2)
    if attention_mask is not None:
        allowed &= attention_mask
    G = query.shape[1] // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, G), repeat_kv(value, G), attn_mask=allowed.repeat_interleave(G, 1), scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register("oracle_test", _oracle_attention)
AttentionMaskInterface.register("oracle_test", sdpa_mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "knorm"])
def test_small_budget_matches_mask_oracle(arch, method):
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((56, 41))
    out = greedy(model, ids, mask, new_tokens=8, cache_implementation=method, cache_config=SMALL[method],
                 return_dict_in_generate=True, output_logits=True)
    cache = out.past_key_values
    P = ids.shape[1]
    for layer_idx, layer in enumerate(cache.layers):
        pos = layer.positions
        keep = torch.zeros(pos.shape[0], pos.shape[1], P, dtype=torch.bool)
        prompt_pos = torch.where((pos >= 0) & (pos < P), pos, P)
        padded = torch.zeros(pos.shape[0], pos.shape[1], P + 1, dtype=torch.bool)
        padded.scatter_(2, prompt_pos, True)
        keep |= padded[..., :P]
        _ORACLE_KEEP[layer_idx] = keep
        assert keep.sum(-1).max() < mask.sum(-1).max(), "the test budget must really evict"
    model.set_attn_implementation("oracle_test")
    ref = greedy(model, ids, mask, new_tokens=8, return_dict_in_generate=True, output_logits=True)
    assert_same_generation(out, ref, atol=2e-5, rtol=1e-4)


def test_streamingllm_keeps_sink_and_recent():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch((40, 30))
    cfg = SMALL["streamingllm"]
    out = greedy(model, ids, mask, new_tokens=30, cache_implementation="streamingllm", cache_config=cfg,
                 return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    slack = max(8, cfg["num_recent_tokens"] // 4)
    P = ids.shape[1]
    for row in range(2):
        pos = sorted(p for p in layer.positions[row, 0].tolist() if p >= 0)
        first_valid = P - int(mask[row].sum())
        assert pos[:2] == [first_valid, first_valid + 1]               # the sinks
        recent = pos[2:]
        assert cfg["num_recent_tokens"] <= len(recent) <= cfg["num_recent_tokens"] + slack
        assert recent == list(range(recent[0], recent[0] + len(recent)))  # a contiguous window ...
        assert recent[-1] == layer.seen - 1                             # ... ending at the newest token


def test_pyramidkv_layers_hold_different_lengths():
    model = tiny_model("llama", layers=4)
    ids, mask = left_padded_batch((64, 64))
    cfg = dict(num_sink_tokens=2, num_top_tokens=20, num_recent_tokens=8, window_size=4)
    out = greedy(model, ids, mask, new_tokens=1, cache_implementation="pyramidkv", cache_config=cfg,
                 return_dict_in_generate=True)
    kept = [row[0] for row in sparse_hf.kv_usage(out.past_key_values).kept_tokens]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) > 1
    # the average middle budget equals SnapKV's: same memory at the same knob
    assert abs(sum(k - 10 - 1 for k in kept) / len(kept) - 20) <= 1


@pytest.mark.parametrize("method", sorted(UNLIMITED))
def test_beam_search(method):
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    ref = greedy(model, ids, mask, new_tokens=6, num_beams=3)
    out = greedy(model, ids, mask, new_tokens=6, num_beams=3, cache_implementation=method,
                 cache_config=UNLIMITED[method])
    assert torch.equal(out, ref)
    small = greedy(model, ids, mask, new_tokens=6, num_beams=3, cache_implementation=method,
                   cache_config=SMALL[method], return_dict_in_generate=True)
    assert small.sequences.shape == ref.shape
    assert small.past_key_values.layers[0].keys.shape[0] == 2 * 3


def test_chunked_prefill_evicts_once_at_the_end():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch((60, 47))
    kw = dict(cache_implementation="snapkv", cache_config=SMALL["snapkv"], return_dict_in_generate=True)
    whole = greedy(model, ids, mask, new_tokens=8, **kw)
    chunked = greedy(model, ids, mask, new_tokens=8, prefill_chunk_size=16, **kw)
    assert torch.equal(whole.sequences, chunked.sequences)
    for a, b in zip(whole.past_key_values.layers, chunked.past_key_values.layers):
        assert torch.equal(a.positions, b.positions)


def test_memory_really_shrinks_after_prefill():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((64, 64))
    cfg = dict(num_sink_tokens=4, num_top_tokens=0.25, num_recent_tokens=8, window_size=4)
    out = greedy(model, ids, mask, new_tokens=1, cache_implementation="snapkv", cache_config=cfg,
                 return_dict_in_generate=True)
    usage = sparse_hf.kv_usage(out.past_key_values)
    budget = 4 + int(0.25 * 64) + 8
    assert all(row == [budget, budget] for row in usage.kept_tokens)
    assert usage.logical_tokens == 64
    assert usage.bytes < 0.5 * usage.full_bytes
    # tokens * B * Hkv * (D * (K+V) * fp32 + one int64 position) * layers
    assert usage.used_bytes == budget * 2 * 2 * (16 * 2 * 4 + 8) * 3


def test_cache_object_and_manual_forward():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    cache = sparse_hf.SnapKVCache(model.config, **UNLIMITED["snapkv"])
    ref = greedy(model, ids, mask, new_tokens=5)
    out = greedy(model, ids, mask, new_tokens=5, past_key_values=cache)
    assert torch.equal(out, ref)
    cache2 = sparse_hf.StreamingLLMCache(model.config, num_sink_tokens=2, num_recent_tokens=8)
    fresh = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="prepare_model"):
        fresh(input_ids=ids, past_key_values=sparse_hf.StreamingLLMCache(fresh.config, num_recent_tokens=8))
    sparse_hf.prepare_model(model)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache2)
    assert sparse_hf.kv_usage(cache2).kept_tokens[0] == [10, 10]


def test_cuda_graph_knob_falls_back_to_eager_on_cpu():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    cfg = dict(SMALL["snapkv"])
    a = greedy(model, ids, mask, new_tokens=6, cache_implementation="snapkv", cache_config=cfg)
    b = greedy(model, ids, mask, new_tokens=6, cache_implementation="snapkv", cache_config=dict(cfg, cuda_graph=True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scope,arch", [("kv_head", "qwen3"), ("layer", "llama")])
def test_knorm_keeps_the_lowest_key_norms(scope, arch):
    """KNorm's kept prompt tokens, against a per-row, per-head loop over the full cache's keys (``layer`` scope:
    one set per row, by the mean over KV heads of the key norms). The layer scope runs on Llama: Qwen3's k_norm
    makes every key norm of a random tiny model ~sqrt(D), so the mean over heads ties to 1e-6 and only rounding
    would decide."""
    from transformers import DynamicCache

    model = tiny_model(arch, layers=2)
    ids, mask = left_padded_batch((40, 33))
    cfg = dict(SMALL["knorm"], selection_scope=scope)
    out = greedy(model, ids, mask, new_tokens=1, cache_implementation="knorm", cache_config=cfg,
                 return_dict_in_generate=True)
    full = DynamicCache(config=model.config)
    model.set_attn_implementation("sdpa")
    model(input_ids=ids, attention_mask=mask, past_key_values=full)
    P = ids.shape[1]
    for layer_idx, layer in enumerate(out.past_key_values.layers):
        keys = full.layers[layer_idx].keys                     # [B, Hkv, P, D] post-RoPE
        for b in range(2):
            cols = [c for c in range(P) if mask[b, c]]
            cands = cols[cfg["num_sink_tokens"]:len(cols) - cfg["num_recent_tokens"]]
            for h in range(keys.shape[1]):
                heads = range(keys.shape[1]) if scope == "layer" else [h]
                norms = {c: sum(float(keys[b, g, c].norm()) for g in heads) / len(heads) for c in cands}
                chosen = sorted(cands, key=lambda c: norms[c])[:cfg["num_top_tokens"]]
                expect = sorted(cols[:cfg["num_sink_tokens"]] + chosen + cols[len(cols) - cfg["num_recent_tokens"]:])
                kept = sorted(p for p in layer.positions[b, h].tolist() if 0 <= p < P)
                assert kept == expect, (layer_idx, b, h)
