"""A lossy (random) compressor through the HF DeltaKV cache: every rebuilt token's K/V equals a float64 reference
made from the model's own raw K/V, at the prompt's end and after decode-time flushes (issue 12's check of the
rebuild path).

The identity compressor of test_deltakv_cache rebuilds every token exactly whatever its fathers, so it cannot see a
wrong father, reference mean, center or position; a random compressor can. The reference is written out by hand:
the centers are the sinks and every ``step``-th compressed token, a token's fathers the ``k`` nearest earlier
centers by brute-force L2 over ``concat(K, V)`` before RoPE, ``x = up(down(x) - down(ref)) + ref`` in float64, then
Qwen3's ``k_norm`` and RoPE through transformers' ``apply_rotary_pos_emb``.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sparse_hf
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.deltakv.state import all_offsets, rebuild_kv
from helpers import ARCHS, greedy, tiny_model

S, STEP, K, RECENT = 3, 4, 2, 4
KNOBS = dict(full_attn_layers="0", num_sink_tokens=S, num_recent_tokens=RECENT, cluster_ratio=1 / STEP,
             deltakv_neighbor_count=K, num_top_tokens=1.0)


def _record_raw_kv(model):
    """Hooks that append every forward's ``k_proj`` / ``v_proj`` output per layer; returns (store, handles)."""
    store: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for j, proj in enumerate((layer.self_attn.k_proj, layer.self_attn.v_proj)):
            def hook(module, args, out, i=i, j=j):
                store.setdefault(i, ([], []))[j].append(out.detach()[0])
            handles.append(proj.register_forward_hook(hook))
    return store, handles


def _reference_x(x: torch.Tensor, count: int, lin) -> torch.Tensor:
    """``[count, Dx]`` float64 rebuild of the tokens at positions ``S .. S + count - 1`` of ``x [n, Dx]``."""
    down = lambda v: v @ lin.down.weight.double().T + lin.down.bias.double()    # noqa: E731
    up = lambda z: z @ lin.up.weight.double().T + lin.up.bias.double()          # noqa: E731
    centers, out = list(range(S)), []
    for j in range(count):
        p = S + j
        if j % STEP == 0:                       # a center: kept raw, visible to itself and every later token
            centers.append(p)
            out.append(x[p])
            continue
        c = torch.tensor(centers)
        fathers = c[(x[c] - x[p]).pow(2).sum(-1).argsort()[:K]]
        ref = x[fathers].mean(0)
        out.append(up(down(x[p]) - down(ref)) + ref)
    return torch.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuilt_kv_of_a_lossy_compressor_equals_a_float64_reference(arch):
    model = tiny_model(arch, layers=3)
    cfg = model.config
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim if getattr(cfg, "head_dim", None) else 16
    torch.manual_seed(3)
    comp = DeltaKVCompressor.for_model(cfg, kv_compressed_size=8)       # random weights, latent 8 of 64: lossy
    ids = torch.randint(1, cfg.vocab_size, (1, 41), generator=torch.Generator().manual_seed(5))
    store, handles = _record_raw_kv(model)
    try:
        out = greedy(model, ids, None, new_tokens=14, cache_implementation="deltakv",
                     cache_config=dict(KNOBS, compressor=comp), return_dict_in_generate=True)
    finally:
        for h in handles:
            h.remove()
    cache = out.past_key_values
    checked = 0
    for i in (1, 2):
        attn = model.model.layers[i].self_attn
        x = torch.cat([torch.cat(store[i][0]), torch.cat(store[i][1])], -1).double()   # [n, Dx] pre-RoPE, raw
        state = cache.layers[i].state
        count = state.counts[0]
        assert count > 41 - S - 2 * RECENT                 # the prompt's end and the decode flushes compressed
        pick, ok = all_offsets(state)
        assert bool(ok.all())
        keys, values, pos = rebuild_kv(state, pick, comp.projections, i, Hkv, D, attn.__dict__["_sparse_hf_rotary"],
                                       getattr(attn, "k_norm", None))
        assert torch.equal(pos[0], torch.arange(S, S + count))
        x_hat = _reference_x(x, count, comp.projections.layers[str(i)])
        k_hat = x_hat[:, :Hkv * D].view(count, Hkv, D)
        if getattr(attn, "k_norm", None) is not None:     # Qwen3: RMS norm per head, then RoPE
            w, eps = attn.k_norm.weight.double(), attn.k_norm.variance_epsilon
            k_hat = w * k_hat / torch.sqrt(k_hat.pow(2).mean(-1, keepdim=True) + eps)
        cos, sin = model.model.rotary_emb(x_hat.float()[None], pos)
        _, k_ref = apply_rotary_pos_emb(k_hat.transpose(0, 1)[None], k_hat.transpose(0, 1)[None], cos.double(),
                                        sin.double())
        v_ref = x_hat[:, Hkv * D:].view(count, Hkv, -1).transpose(0, 1)[None]
        torch.testing.assert_close(keys.double(), k_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(values.double(), v_ref, atol=2e-5, rtol=2e-5)
        # lossy indeed: the rebuilt values are far from the raw ones (the reference, not the identity, is matched)
        v_raw = x[S:S + count, Hkv * D:].view(count, Hkv, -1).transpose(0, 1)[None]
        assert float((values.double() - v_raw).detach().norm() / v_raw.norm()) > 0.05
        checked += 1
    assert checked == 2
