"""OmniKV on the HF path against vanilla generation and a naive per-row oracle."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparse_hf
from helpers import ARCHS, assert_same_generation, greedy, left_padded_batch, tiny_model
from sparse_hf.methods.omnikv import OmniKVConfig

SMALL = dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2")
ORACLE: dict = {}


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """DynamicCache + a per-row, loop-based re-implementation of OmniKV's decode selection."""
    cfg, i = ORACLE["cfg"], module.layer_idx
    full = [int(x) for x in cfg["full_attn_layers"].split(",")]
    q_len = query.shape[2]
    if i in full or q_len > 1:
        if i in full and q_len == 1 and i + 1 not in full:
            ORACLE["sel"] = _naive_select(query, key, attention_mask, scaling, cfg)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    B, Hkv, L, _ = key.shape
    allowed = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    for b, cols in enumerate(ORACLE["sel"]):
        allowed[b, 0, 0, cols] = True
    G = query.shape[1] // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, G), repeat_kv(value, G),
                                                           attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2), None


def _naive_select(query, key, attention_mask, scaling, cfg):
    B, H = query.shape[:2]
    G = H // key.shape[1]
    L = key.shape[2]
    selections = []
    for b in range(B):
        cols = [c for c in range(L) if attention_mask is None or bool(attention_mask[b, 0, -1, c])]
        sink, recent, top = cfg["num_sink_tokens"], cfg["num_recent_tokens"], cfg["num_top_tokens"]
        if len(cols) <= sink + recent + top:
            selections.append(cols)
            continue
        cands = cols[sink:len(cols) - recent]
        best = {}
        for h in range(H):
            logits = torch.stack([(query[b, h, 0].double() @ key[b, h // G, c].double()) * scaling for c in cands])
            probs = torch.softmax(logits, 0)
            for c, p in zip(cands, probs.tolist()):
                best[c] = max(best.get(c, 0.0), p)
        kernel = cfg.get("pool_kernel_size", OmniKVConfig().pool_kernel_size)     # absent: the method's default
        r = kernel // 2                                  # pooling: each candidate takes its neighbours' max
        pooled = {c: max(best[d] for d in cands[max(0, t - r):t + r + 1]) for t, c in enumerate(cands)}
        chosen = sorted(cands, key=lambda c: -pooled[c])[:top]
        selections.append(sorted(cols[:sink] + chosen + cols[len(cols) - recent:]))
    return selections


AttentionInterface.register("omnikv_oracle", _oracle_attention)
AttentionMaskInterface.register("omnikv_oracle", sdpa_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_unlimited_budget_matches_dynamic_cache(arch):
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch()
    ref = greedy(model, ids, mask, new_tokens=10)
    out = greedy(model, ids, mask, new_tokens=10, cache_implementation="omnikv",
                 cache_config=dict(num_top_tokens=1.0, full_attn_layers="0,1"))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch,kernel", [(arch, None) for arch in ARCHS] + [("llama", 1), ("llama", 3), ("qwen2", 5)])
def test_selection_matches_naive_oracle(arch, kernel):
    """A small budget against the loop oracle (float64, per row), at the default ``pool_kernel_size`` (``None``) and
    at explicit ones (the observer's scores max-pooled over neighbouring candidates before the top-k; 1: none); the
    budget really sparsifies, and the pooling changes the selection."""
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((40, 29))
    cfg = SMALL if kernel is None else dict(SMALL, pool_kernel_size=kernel)
    out = greedy(model, ids, mask, new_tokens=8, cache_implementation="omnikv", cache_config=cfg,
                 return_dict_in_generate=True, output_logits=True)
    ORACLE["cfg"] = cfg
    model.set_attn_implementation("omnikv_oracle")
    ref = greedy(model, ids, mask, new_tokens=8, return_dict_in_generate=True, output_logits=True)
    assert_same_generation(out, ref, atol=2e-5, rtol=1e-4)
    model.set_attn_implementation("sdpa")
    full = greedy(model, ids, mask, new_tokens=8, return_dict_in_generate=True, output_logits=True)
    assert not torch.allclose(full.logits[-1], out.logits[-1], atol=1e-4), "the budget must really sparsify"
    if kernel is not None and kernel > 1:
        plain = greedy(model, ids, mask, new_tokens=8, cache_implementation="omnikv",
                       cache_config=dict(SMALL, pool_kernel_size=1), return_dict_in_generate=True, output_logits=True)
        assert not torch.allclose(plain.logits[-1], out.logits[-1], atol=1e-4), "pooling must change the selection"


def test_logical_masking_keeps_memory_and_fraction_budget():
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((64, 50))
    out = greedy(model, ids, mask, new_tokens=4, cache_implementation="omnikv",
                 cache_config=dict(SMALL, num_top_tokens=0.1), return_dict_in_generate=True)
    cache = out.past_key_values
    usage = sparse_hf.kv_usage(cache)
    # nothing evicted: the full K/V (head_dim 16, fp32) plus one int64 position per slot
    assert usage.used_bytes == usage.full_bytes * (16 * 2 * 4 + 8) // (16 * 2 * 4)
    idx, ok = cache.selection
    assert ok.sum(-1).tolist() == [2 + 6 + int(0.1 * 67), 2 + 6 + int(0.1 * 53)]


def test_layer_zero_must_filter():
    model = tiny_model(layers=4)
    with pytest.raises(ValueError, match="must include layer 0"):
        sparse_hf.OmniKVCache(model.config, full_attn_layers="1,2")


def test_chunked_prefill_acceleration():
    model = tiny_model("llama", layers=4)
    ids, mask = left_padded_batch((64, 51))
    ref = greedy(model, ids, mask, new_tokens=6)
    loose = dict(num_top_tokens=1.0, num_top_tokens_in_prefill=1.0, full_attn_layers="0,2",
                 chunk_prefill_accel_omnikv=True)
    out = greedy(model, ids, mask, new_tokens=6, prefill_chunk_size=16, cache_implementation="omnikv",
                 cache_config=loose)
    assert torch.equal(out, ref)
    tight = dict(loose, num_top_tokens_in_prefill=4, num_sink_tokens=2, num_recent_tokens=4)
    plain = greedy(model, ids, mask, new_tokens=6, prefill_chunk_size=16, cache_implementation="omnikv",
                   cache_config=dict(tight, chunk_prefill_accel_omnikv=False), output_logits=True,
                   return_dict_in_generate=True)
    accel = greedy(model, ids, mask, new_tokens=6, prefill_chunk_size=16, cache_implementation="omnikv",
                   cache_config=tight, output_logits=True, return_dict_in_generate=True)
    # sparse prefill changes what the sparse layers saw: the first token's logits differ
    assert not torch.allclose(plain.logits[0], accel.logits[0], atol=1e-5)
