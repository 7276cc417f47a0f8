"""The DeltaKV cache on the HF path: exactness with an identity compressor, the selection against a naive
oracle, real memory savings, and bad input."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparse_hf
from sparse_hf.deltakv import DeltaKVCompressor
from helpers import ARCHS, assert_same_generation, greedy, left_padded_batch, tiny_model

BASE = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
            deltakv_neighbor_count=2)



@pytest.mark.parametrize("arch", ARCHS)
def test_identity_compressor_matches_full_cache(arch):
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((48, 37))
    ref = greedy(model, ids, mask, new_tokens=16, output_logits=True, return_dict_in_generate=True)
    cfg = dict(BASE, compressor=DeltaKVCompressor.identity_for(model.config), num_top_tokens=1.0)
    out = greedy(model, ids, mask, new_tokens=16, cache_implementation="deltakv", cache_config=cfg,
                 output_logits=True, return_dict_in_generate=True)
    assert min(out.past_key_values.layers[2].compressed_per_row()) > 20   # most tokens went through compression
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- naive oracle: full cache; DeltaKV layers see head + top-k compressed columns + raw buffer ---------------------
ORACLE: dict = {}


def _oracle(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cfg, i = ORACLE["cfg"], module.layer_idx
    B, Hkv, L, _ = key.shape
    q_len = query.shape[2]
    if i == 0 and q_len == 1:
        _advance_flush(L - 1)                       # compression happened after the previous forward
    if i in (0, 1):
        if i == 1 and q_len == 1:
            ORACLE["scores"] = _naive_scores(query, key, attention_mask, scaling, cfg)
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        return out
    if q_len > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    allowed = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    for b in range(B):
        head, n = ORACLE["head"][b], ORACLE["n"][b]      # each row: its own sinks and compressed count
        allowed[b, 0, 0, :head] = True
        allowed[b, 0, 0, head + n:] = True
        region = ORACLE["scores"][b][head:head + n]
        top = cfg["num_top_tokens"]
        chosen = sorted(range(n), key=lambda j: -region[j])[:top] if n > top else range(n)
        for j in chosen:
            allowed[b, 0, 0, head + j] = True
    if attention_mask is not None:
        allowed &= attention_mask
    G = query.shape[1] // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, G), repeat_kv(value, G),
                                                           attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2), None


def _advance_flush(seen):
    r = ORACLE["cfg"]["num_recent_tokens"]
    for b, head in enumerate(ORACLE["head"]):
        buffered = seen - head - ORACLE["n"][b]
        if buffered >= 2 * r:
            ORACLE["n"][b] += (buffered - r) // r * r


def _naive_scores(query, key, attention_mask, scaling, cfg):
    B, H = query.shape[:2]
    G = H // key.shape[1]
    scores = []
    for b in range(B):
        cols = [c for c in range(key.shape[2]) if attention_mask is None or bool(attention_mask[b, 0, -1, c])]
        cands = cols[cfg["num_sink_tokens"]:len(cols) - cfg["num_recent_tokens"]]
        row = [float("-inf")] * key.shape[2]
        for h in range(H):
            logits = torch.stack([(query[b, h, 0].double() @ key[b, h // G, c].double()) * scaling for c in cands])
            for c, p in zip(cands, torch.softmax(logits, 0).tolist()):
                row[c] = max(row[c], p)
        scores.append(row)
    return scores


AttentionInterface.register("deltakv_oracle", _oracle)
AttentionMaskInterface.register("deltakv_oracle", sdpa_mask)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_top_k_selection_matches_naive_oracle(arch):
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((44, 35))
    # the oracle scores without pooling (pooled scores against a per-row loop: test_omnikv_pooling.py)
    cfg = dict(BASE, compressor=DeltaKVCompressor.identity_for(model.config), num_top_tokens=5, pool_kernel_size=1)
    out = greedy(model, ids, mask, new_tokens=10, cache_implementation="deltakv", cache_config=cfg,
                 output_logits=True, return_dict_in_generate=True)
    P = ids.shape[1]
    pads = (mask == 0).sum(-1).tolist()
    ORACLE.update(cfg=cfg, head=[p + cfg["num_sink_tokens"] for p in pads], n=[0] * len(pads))
    _advance_flush(P)                                   # the prompt's own flush
    model.set_attn_implementation("deltakv_oracle")
    ref = greedy(model, ids, mask, new_tokens=10, output_logits=True, return_dict_in_generate=True)
    assert_same_generation(out, ref, atol=1e-5, rtol=1e-4)


def test_memory_really_shrinks():
    model = tiny_model("qwen2", layers=6)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=8)   # D = 2*2*16 = 64 -> 8
    ids, mask = left_padded_batch((500, 480))
    out = greedy(model, ids, mask, new_tokens=4, cache_implementation="deltakv",
                 cache_config=dict(BASE, compressor=comp, num_top_tokens=0.1, num_recent_tokens=8,
                                   cluster_ratio=0.1), return_dict_in_generate=True)
    cache = out.past_key_values
    usage = sparse_hf.kv_usage(cache)
    assert usage.kept_tokens[3] == [503, 483]          # every real token is still represented ...
    per_layer_full = usage.full_bytes / len(cache.layers)
    shared = cache.layers[2].shared.nbytes()            # the scratch all compressed layers share (layer 2 counts it)
    for layer in cache.layers[2:]:                      # ... in < half the bytes in the compressed layers
        own = layer.allocated_bytes() - (shared if layer is cache.layers[2] else 0)
        assert own < 0.5 * per_layer_full                # (latent 8 of 64 values, 10% raw centers)
    assert usage.bytes < 0.7 * usage.full_bytes         # the 2 filter layers stay raw


def test_deltakv_path_round_trip(tmp_path):
    model = tiny_model("llama", layers=4)
    torch.manual_seed(1)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    comp.save_pretrained(tmp_path / "comp")
    ids, mask = left_padded_batch((40, 33))
    kw = dict(new_tokens=8, cache_implementation="deltakv", output_logits=True, return_dict_in_generate=True)
    a = greedy(model, ids, mask, cache_config=dict(BASE, compressor=comp, num_top_tokens=6), **kw)
    b = greedy(model, ids, mask, cache_config=dict(BASE, deltakv_path=str(tmp_path / "comp"), num_top_tokens=6),
               **kw)
    assert torch.equal(a.sequences, b.sequences)
    core = greedy(model, ids, mask, cache_config=dict(BASE, compressor=comp.projections, num_top_tokens=6), **kw)
    assert torch.equal(a.sequences, core.sequences)                   # the core module serves as well


def test_bad_input():
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="needs a compressor"):
        sparse_hf.DeltaKVCache(model.config, **BASE)
    other = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="does not fit this model"):
        sparse_hf.DeltaKVCache(model.config, compressor=DeltaKVCompressor.identity_for(other.config), **BASE)
    with pytest.raises((ValueError, OSError), match="not|No"):
        sparse_hf.DeltaKVCache(model.config, deltakv_path="/nonexistent/compressor", **BASE)
    with pytest.raises(ValueError, match="must include layer 0"):
        sparse_hf.DeltaKVCache(model.config, compressor=DeltaKVCompressor.identity_for(model.config),
                               **dict(BASE, full_attn_layers="1"))
    partial = DeltaKVCompressor.for_model(model.config, compressed_layers=[2])
    with pytest.raises(ValueError, match="no weights for layers"):
        sparse_hf.DeltaKVCache(model.config, compressor=partial, **BASE)


def test_clustering_defaults_follow_the_compressor(tmp_path):
    model = tiny_model("llama", layers=4)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    comp.save_pretrained(tmp_path / "c", training={"cluster_ratio": 0.25, "neighbor_count": 3})
    knobs = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4)
    cache = sparse_hf.DeltaKVCache(model.config, deltakv_path=str(tmp_path / "c"), **knobs)
    assert cache.sparse_config.deltakv_neighbor_count == 3 and cache.method.step == 4
    cache = sparse_hf.DeltaKVCache(model.config, deltakv_path=str(tmp_path / "c"), deltakv_neighbor_count=2,
                                   cluster_ratio=0.5, **knobs)
    assert cache.sparse_config.deltakv_neighbor_count == 2 and cache.method.step == 2
    fresh = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)     # no training record: 0.1 and 1
    untrained = sparse_hf.DeltaKVCache(model.config, compressor=fresh, **knobs)
    assert untrained.sparse_config.deltakv_neighbor_count == 1 and untrained.method.step == 10


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_latents_shrink_memory_and_stay_close(bits):
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=32)
    ids, mask = left_padded_batch((300, 280))
    kw = dict(new_tokens=4, cache_implementation="deltakv", output_logits=True, return_dict_in_generate=True)
    cfg = dict(BASE, compressor=comp, num_top_tokens=1.0, cluster_ratio=0.1)
    plain = greedy(model, ids, mask, cache_config=cfg, **kw)
    quant = greedy(model, ids, mask, cache_config=dict(cfg, kv_quant_bits=bits), **kw)
    layer_p, layer_q = plain.past_key_values.layers[3], quant.past_key_values.layers[3]
    assert layer_q.state.latent.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    # fp32 latents of 32 values (128 bytes) -> int8: 32 + 4 bytes; int4: 16 + 2 + 2 bytes
    assert layer_q.state.latent.nbytes() == layer_p.state.latent.nbytes() * (36 if bits == 8 else 20) // 128
    assert layer_q.allocated_bytes() < layer_p.allocated_bytes()
    tol = 5e-2 if bits == 8 else 2e-1
    torch.testing.assert_close(quant.logits[0], plain.logits[0], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="kv_quant_bits"):
        sparse_hf.DeltaKVCache(model.config, compressor=comp, kv_quant_bits=3, **BASE)
    odd = DeltaKVCompressor.for_model(model.config, kv_compressed_size=15)
    with pytest.raises(ValueError, match="must be even"):
        sparse_hf.DeltaKVCache(model.config, compressor=odd, kv_quant_bits=4, **BASE)


def test_unrotate_inverts_rope_with_scaling_in_float64():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from sparse_hf.deltakv.rope import rotate, unrotate

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 64})
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    k = torch.randn(2, 3, 50, 16, dtype=torch.float64)
    pos = torch.arange(50).expand(2, 50) + torch.tensor([[0], [100]])
    cos, sin = rotary(k, pos)
    cos, sin = cos.double(), sin.double()
    assert not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos))   # yarn scales cos and sin
    torch.testing.assert_close(unrotate(rotate(k, cos, sin), cos, sin), k, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pre_rope_keys_are_kept_only_behind_k_norm(arch):
    model = tiny_model(arch, layers=4)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    ids, mask = left_padded_batch((200, 180))
    out = greedy(model, ids, mask, new_tokens=2, cache_implementation="deltakv", return_dict_in_generate=True,
                 cache_config=dict(BASE, compressor=comp, num_top_tokens=1.0))
    layer = out.past_key_values.layers[3]
    assert min(layer.compressed_per_row()) > 0
    assert (layer.raw_kpre is not None) == (arch == "qwen3")


def test_father_ids_are_int16_until_the_centers_outgrow_it():
    from sparse_hf.deltakv.state import _father_dtype

    assert _father_dtype(100, None) == torch.int16                      # half the bytes while centers fit
    assert _father_dtype(40001, None) == torch.int32
    assert _father_dtype(40001, torch.zeros(1, dtype=torch.int16)) == torch.int32
    assert _father_dtype(100, torch.zeros(1, dtype=torch.int32)) == torch.int32   # never narrows again


def test_model_that_ran_deltakv_still_compiles_without_it():
    """Once a model has run a sparse cache, ``import sparse_hf``'s attention and ``k_proj`` hooks stay on it. A later
    ``torch.compile`` of a call without a sparse cache (HF's own compiled StaticCache path, run in the same process
    by ``bench_engine.py --hf-methods``) must trace through them: the H200 run of 2026-12-02 failed there with
    Dynamo's "unsupported method call setdefault" on the hooks' thread-local."""
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=8)
    ids, mask = left_padded_batch((40, 33))
    greedy(model, ids, mask, new_tokens=3, cache_implementation="deltakv",
           cache_config=dict(BASE, compressor=comp, num_top_tokens=0.5, num_recent_tokens=4))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want)
