"""H2O against an independent oracle: a full ``DynamicCache`` run whose attention function masks out the tokens
that a naive per-row, per-head loop (float64) has evicted. Tokens and the kept positions must agree."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import sdpa_mask

try:
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # older transformers build SDPA's mask for any attention function
    AttentionMaskInterface = None

from sparse_hf.methods.h2o import attention_mass
from helpers import greedy, left_padded_batch, tiny_model

SINK, RECENT, TOP = 2, 4, 6


class H2OOracle:
    """Per layer: ``acc[b][h]`` accumulated attention per column and ``kept[b][h]`` the set of kept columns."""

    def __init__(self, prompt_len: int, top, normalization: str = "sum"):
        self.prompt_len, self.top, self.normalization = prompt_len, top, normalization
        self.acc, self.kept, self.seen = {}, {}, {}

    def budget(self, n_prompt: int) -> int:
        top = int(n_prompt * self.top) if isinstance(self.top, float) else self.top
        return SINK + RECENT + top

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = module.layer_idx
        B, H, q, D = query.shape
        Hkv, T = key.shape[1], key.shape[2]
        G = H // Hkv
        out = torch.zeros(B, q, H, D, dtype=query.dtype)
        if layer not in self.acc:
            self.acc[layer] = [[{} for _ in range(Hkv)] for _ in range(B)]
            self.kept[layer] = [[set() for _ in range(Hkv)] for _ in range(B)]
            self.seen[layer] = [[{} for _ in range(Hkv)] for _ in range(B)]
        assert attention_mask is None or attention_mask.dtype == torch.bool   # None: no padding, causal
        for b in range(B):
            real = [j for j in range(T) if attention_mask is None or bool(attention_mask[b, 0, -1, j])]
            for h in range(Hkv):
                acc, kept, seen = self.acc[layer][b][h], self.kept[layer][b][h], self.seen[layer][b][h]
                kept.update(j for j in real if j >= T - q)                     # the new tokens join
                for i in range(q):
                    col = T - q + i
                    if col not in real:
                        continue                                               # a padding query
                    cols = sorted(j for j in kept if j <= col)
                    for j in cols:
                        seen[j] = seen.get(j, 0) + 1                           # queries that saw column j
                    for g in range(G):
                        hq = h * G + g
                        logits = torch.stack([query[b, hq, i].double() @ key[b, h, j].double() for j in cols]) * scaling
                        p = torch.softmax(logits, 0)
                        out[b, i, hq] = sum(p[n] * value[b, h, j].double() for n, j in enumerate(cols)).to(out.dtype)
                        for n, j in enumerate(cols):
                            acc[j] = acc.get(j, 0.0) + float(p[n])
                prompt_done = T >= self.prompt_len
                if prompt_done:
                    n_prompt = sum(1 for j in real if j < self.prompt_len)
                    live = sorted(kept)
                    if len(live) > self.budget(n_prompt):
                        middle = live[SINK:len(live) - RECENT]
                        n_top = self.budget(n_prompt) - SINK - RECENT
                        rank = acc if self.normalization == "sum" else {j: acc[j] / seen[j] for j in middle}
                        heavy = sorted(middle, key=lambda j: -rank[j])[:n_top]
                        kept.intersection_update(set(live[:SINK]) | set(live[len(live) - RECENT:]) | set(heavy))
        return out, None


def oracle_model(arch, oracle):
    """A fresh copy of the model (never touched by sparse-hf) with the oracle as its attention function."""
    AttentionInterface.register("h2o_oracle", oracle.attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register("h2o_oracle", sdpa_mask)   # a [B, 1, q, T] bool mask (True = attend)
    model = tiny_model(arch, layers=3).double()
    model.set_attn_implementation("h2o_oracle")
    return model


def run_oracle(arch, ids, mask, new_tokens, top, normalization="sum"):
    oracle = H2OOracle(ids.shape[1], top, normalization)
    model = oracle_model(arch, oracle)
    seq = greedy(model, ids, mask, new_tokens=new_tokens)
    return seq, oracle


@pytest.mark.parametrize("arch, lengths, top", [("llama", (30, 21), TOP), ("qwen3", (26, 26), TOP),
                                                ("qwen2", (33, 17), 0.25)])
def test_h2o_matches_naive_oracle(arch, lengths, top):
    model = tiny_model(arch, layers=3).double()
    ids, mask = left_padded_batch(lengths)
    new = 8
    out = greedy(model, ids, mask, new_tokens=new, cache_implementation="h2o", return_dict_in_generate=True,
                 cache_config=dict(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top))
    ref, oracle = run_oracle(arch, ids, mask, new, top)
    assert torch.equal(out.sequences, ref)
    cache = out.past_key_values
    evicted = False
    for layer_idx, layer in enumerate(cache.layers):
        for b in range(ids.shape[0]):
            for h in range(layer.positions.shape[1]):
                pos = layer.positions[b, h]
                ours = set(pos[pos >= 0].tolist())
                want = oracle.kept[layer_idx][b][h]
                # the last generated token is not fed back, so neither side has seen it
                assert ours == want, (layer_idx, b, h)
                evicted |= len(ours) < int(mask[b].sum()) + new - 1
                assert len(ours) <= oracle.budget(int(mask[b].sum()))
    assert evicted


@pytest.mark.parametrize("arch, lengths, top", [("llama", (30, 21), TOP), ("qwen2", (33, 17), 0.25)])
def test_h2o_mean_normalization_matches_naive_oracle(arch, lengths, top):
    """``score_normalization="mean"`` (mass / the number of queries that saw the token, kvpress's rule) against the
    float64 oracle counting those queries itself; the kept sets must differ from the default rule's somewhere."""
    model = tiny_model(arch, layers=3).double()
    ids, mask = left_padded_batch(lengths)
    new = 8
    knobs = dict(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top)
    out = greedy(model, ids, mask, new_tokens=new, cache_implementation="h2o", return_dict_in_generate=True,
                 cache_config=dict(knobs, score_normalization="mean"))
    ref, oracle = run_oracle(arch, ids, mask, new, top, normalization="mean")
    _, summed = run_oracle(arch, ids, mask, new, top)
    assert torch.equal(out.sequences, ref)
    differs = False
    for layer_idx, layer in enumerate(out.past_key_values.layers):
        for b in range(ids.shape[0]):
            for h in range(layer.positions.shape[1]):
                pos = layer.positions[b, h]
                assert set(pos[pos >= 0].tolist()) == oracle.kept[layer_idx][b][h], (layer_idx, b, h)
                differs |= oracle.kept[layer_idx][b][h] != summed.kept[layer_idx][b][h]
    assert differs, "the two rules kept the same tokens: the test does not tell them apart"


def test_default_normalization_is_sum():
    """The default is unchanged (the H2O authors' raw sum), and a bad value is refused."""
    from sparse_hf.methods.h2o import H2OConfig
    assert H2OConfig().score_normalization == "sum"
    with pytest.raises(ValueError, match="score_normalization"):
        H2OConfig(score_normalization="avg")


def test_attention_mass_matches_a_loop():
    """The accumulated-attention formula against a per-row, per-query, per-head float64 loop."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, q, L, D = 2, 4, 2, 3, 7, 5
    queries, keys = torch.randn(B, H, q, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    key_pos = torch.arange(L).expand(B, Hkv, L).clone()
    key_valid = torch.ones(B, Hkv, L, dtype=torch.bool)
    key_valid[1, :, :2] = False                                    # row 1 is left-padded by two
    query_pos = torch.arange(L - q, L)
    query_valid = torch.tensor([[True, True, True], [False, True, True]])
    mass = attention_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, 0.5, block=2)
    want = torch.zeros(B, Hkv, L, dtype=torch.float64)
    for b in range(B):
        for hq in range(H):
            h = hq // (H // Hkv)
            for i in range(q):
                if not query_valid[b, i]:
                    continue
                cols = [j for j in range(L) if key_valid[b, h, j] and j <= query_pos[i]]
                logits = torch.tensor([float(queries[b, hq, i].double() @ keys[b, h, j].double()) * 0.5 for j in cols])
                for j, p in zip(cols, torch.softmax(logits, 0)):
                    want[b, h, j] += p
    torch.testing.assert_close(mass.double(), want, atol=1e-6, rtol=1e-5)


def test_h2o_unlimited_budget_equals_plain_generate():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch((40, 23))
    ref = greedy(model, ids, mask, new_tokens=8)
    out = greedy(model, ids, mask, new_tokens=8, cache_implementation="h2o", cache_config=dict(num_top_tokens=1.0))
    assert torch.equal(out, ref)


def test_h2o_chunked_prefill_and_beams():
    """Prefill in chunks accumulates the same attention (so keeps the same tokens) as one pass; beams reorder
    the scores with the slots."""
    model = tiny_model("llama", layers=3).double()
    ids, mask = left_padded_batch((40, 27))
    knobs = dict(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=TOP)
    whole = greedy(model, ids, mask, new_tokens=6, cache_implementation="h2o", cache_config=knobs,
                   return_dict_in_generate=True)
    chunked = greedy(model, ids, mask, new_tokens=6, cache_implementation="h2o", cache_config=knobs,
                     return_dict_in_generate=True, prefill_chunk_size=16)
    assert torch.equal(whole.sequences, chunked.sequences)
    for a, b in zip(whole.past_key_values.layers, chunked.past_key_values.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False,
                           cache_implementation="h2o", cache_config=knobs, return_dict_in_generate=True)
    for layer in beams.past_key_values.layers:
        assert layer.scores.shape == layer.positions.shape and layer.row_budget.shape == (4,)   # 2 rows x 2 beams


@pytest.mark.gpu
def test_h2o_gpu_matches_cpu():
    """On CUDA the decode attention runs in Triton while the scores are accumulated in torch: the prompt's kept
    tokens and the first steps' logits must agree with the CPU run."""
    model = tiny_model("qwen2", layers=3)
    ids, mask = left_padded_batch((48, 33))
    kw = dict(cache_implementation="h2o", cache_config=dict(num_sink_tokens=SINK, num_recent_tokens=RECENT,
                                                           num_top_tokens=TOP), output_logits=True,
              return_dict_in_generate=True)
    cpu = greedy(model, ids, mask, new_tokens=1, **kw)
    gpu = greedy(model.cuda(), ids.cuda(), mask.cuda(), new_tokens=1, **kw)
    for a, b in zip(cpu.past_key_values.layers, gpu.past_key_values.layers):
        assert torch.equal(a.positions, b.positions.cpu())
    cpu = greedy(model.cpu(), ids, mask, new_tokens=4, **kw)
    gpu = greedy(model.cuda(), ids.cuda(), mask.cuda(), new_tokens=4, **kw)
    for a, b in zip(cpu.logits[:2], gpu.logits[:2]):
        torch.testing.assert_close(a, b.cpu(), atol=2e-3, rtol=2e-3)
