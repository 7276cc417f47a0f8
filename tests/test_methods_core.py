"""Every registered method on synthetic tensors (no model), against a plain per-row loop oracle in float64.

The oracles are written here from the papers' definitions, independently of the method code: they compute each
token's score and check that the method kept sinks, recent tokens and a top-k set by that score (any top-k: ties,
e.g. from SnapKV's max-pooling, may be broken either way). Rows are left-padded to different lengths. A method
added to the registry is picked up automatically and fails here until it has an oracle.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_hf.methods import METHODS, get_method

B, H, HKV, L, D, W = 3, 4, 2, 40, 8, 6
G = H // HKV
LENGTHS = (40, 31, 17)                   # real tokens per row; rows are left-padded
SCALING = 1 / math.sqrt(D)
SINK, RECENT = 2, 6


def synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, L, D, generator=g) * torch.rand(B, HKV, L, 1, generator=g).mul(2).add(0.2)
    queries = torch.randn(B, H, L, D, generator=g) * 1.5
    valid_cols = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        valid_cols[b, L - n:] = True
    return keys, queries, valid_cols


def real_cols(b):
    return list(range(L - LENGTHS[b], L))


def kept_sets(plan, valid):
    """``{(b, h): set of kept slots}`` from ``(idx, ok)`` ``[B, Hkv, K]`` (``None``: every valid slot)."""
    out = {}
    for b in range(B):
        for h in range(valid.shape[1]):
            if plan is None:
                out[b, h] = set(torch.nonzero(valid[b, h]).flatten().tolist())
            else:
                idx, ok = plan
                out[b, h] = set(idx[b, h][ok[b, h]].tolist())
    return out


def assert_sink_top_recent(kept: set, real: list, scores: dict, sink: int, recent: int, k: int, who=""):
    """``kept`` = the first ``sink`` + the last ``recent`` of ``real`` + a top-``k`` of the rest by ``scores``."""
    protected = set(real[:sink]) | (set(real[-recent:]) if recent else set())
    cands = [j for j in real if j not in protected]
    k = min(k, len(cands))
    assert protected <= kept, (who, sorted(protected - kept))
    middle = kept - protected
    assert middle <= set(cands) and len(middle) == k, (who, len(middle), k)
    rest = [scores[j] for j in cands if j not in middle]
    if middle and rest:
        lowest_kept, highest_dropped = min(scores[j] for j in middle), max(rest)
        assert lowest_kept >= highest_dropped - 1e-5 * max(1.0, abs(highest_dropped)), (who, lowest_kept,
                                                                                         highest_dropped)


def top_of(budget, n):
    return int(n * budget) if isinstance(budget, float) else budget


# -- oracles: one per registered method --------------------------------------------------------------------------
def snapkv_like_oracle(name, layer_top):
    """SnapKV/PyramidKV: per query head, softmax over the candidates of each real window query, mean over those
    queries, max-pool (kernel 3) along the slots; then the max over the heads of the KV group
    (``selection_scope="kv_head"``) or over all heads of the layer (``"layer"``: every KV head keeps the same
    tokens); keep a top-k."""
    keys, queries, valid_cols = synthetic(1)
    cls = get_method(name)
    num_layers = 4
    window = queries[:, :, L - W:]
    query_valid = valid_cols[:, L - W:]
    valid = valid_cols.unsqueeze(1).expand(B, HKV, L)
    pooled = {}                                      # (b, query head) -> {slot: pooled window-mean probability}
    for b in range(B):
        real = real_cols(b)
        protected = set(real[:SINK]) | set(real[-RECENT:])
        cands = [j for j in real if j not in protected]
        for hq in range(H):
            mean = {j: 0.0 for j in range(L)}
            n_q = 0
            for w in range(W):
                if not bool(query_valid[b, w]):
                    continue
                n_q += 1
                logits = torch.tensor([float(window[b, hq, w].double() @ keys[b, hq // G, j].double())
                                       * SCALING for j in cands], dtype=torch.float64)
                for j, p in zip(cands, torch.softmax(logits, 0).tolist()):
                    mean[j] += p
            mean = {j: v / max(1, n_q) for j, v in mean.items()}
            pooled[b, hq] = {j: max(mean[i] for i in range(max(0, j - 1), min(L, j + 2))) for j in range(L)}
    for scope in ("kv_head", "layer"):
        for top in (5, 0.25):
            method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top,
                                          window_size=W, pool_kernel_size=3, selection_scope=scope), num_layers)
            for layer in range(num_layers):
                plan = method.prefill_keep(layer, keys, valid, window, query_valid, SCALING)
                kept = kept_sets(plan, valid)
                for b in range(B):
                    real = real_cols(b)
                    for h in range(HKV):
                        heads = range(h * G, (h + 1) * G) if scope == "kv_head" else range(H)
                        scores = {j: max(pooled[b, hq][j] for hq in heads) for j in real}
                        k = layer_top(top, len(real), layer, num_layers)
                        assert_sink_top_recent(kept[b, h], real, scores, SINK, RECENT, k,
                                               (name, scope, top, layer, b, h))
                    if scope == "layer":
                        assert all(kept[b, h] == kept[b, 0] for h in range(HKV)), (name, top, layer, b)


def oracle_snapkv(name):
    snapkv_like_oracle(name, lambda top, n, layer, num_layers: top_of(top, n))


def oracle_pyramidkv(name):
    def layer_top(top, n, layer, num_layers):
        # The pyramid schedule from its definition: ratio 0.6 at layer 0 falling linearly to 0.01 at the last
        # layer, normalised so that the mean layer keeps ``top``.
        ratios = [0.6 + (0.01 - 0.6) * i / (num_layers - 1) for i in range(num_layers)]
        return int(round(top_of(top, n) * ratios[layer] * num_layers / sum(ratios)))
    snapkv_like_oracle(name, layer_top)


def oracle_knorm(name):
    """Lowest key L2 norms per KV head (``selection_scope="kv_head"``) or by the mean norm over the KV heads, one
    selection for the layer (``"layer"``)."""
    keys, _, valid_cols = synthetic(2)
    cls = get_method(name)
    norms = {(b, h, j): math.sqrt(sum(float(x) ** 2 for x in keys[b, h, j].double()))
             for b in range(B) for h in range(HKV) for j in range(L)}
    for scope in ("kv_head", "layer"):
        for top in (5, 0.25):
            method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top,
                                          selection_scope=scope), 2)
            valid = valid_cols.unsqueeze(1).expand(B, HKV, L)
            kept = kept_sets(method.prefill_keep(0, keys, valid, None, None, SCALING), valid)
            for b in range(B):
                for h in range(HKV):
                    heads = [h] if scope == "kv_head" else range(HKV)
                    scores = {j: -sum(norms[b, g, j] for g in heads) / len(heads) for j in range(L)}
                    assert_sink_top_recent(kept[b, h], real_cols(b), scores, SINK, RECENT, top_of(top, LENGTHS[b]),
                                           (scope, top, b, h))
                if scope == "layer":
                    assert all(kept[b, h] == kept[b, 0] for h in range(HKV))


def oracle_streamingllm(name):
    cls = get_method(name)
    keys, _, valid_cols = synthetic(3)
    method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT), 2)
    valid = valid_cols.unsqueeze(1).expand(B, HKV, L)
    kept = kept_sets(method.prefill_keep(0, keys, valid, None, None, SCALING), valid)
    for b in range(B):
        real = real_cols(b)
        for h in range(HKV):
            assert kept[b, h] == set(real[:SINK]) | set(real[-RECENT:])
    # decode: the window rolls once it has grown by the slack, and not before (a shape check, no sync)
    grown = torch.ones(B, HKV, SINK + RECENT + 1, dtype=torch.bool)
    assert method.decode_keep(0, grown) is None


def oracle_h2o(name):
    """Accumulated attention: for every real prompt query, the causal softmax over real keys, summed over queries
    and the query heads of each KV group; keep a top-k. Then one decode step under the same per-row budget."""
    keys, queries, valid_cols = synthetic(4)
    cls = get_method(name)
    for top in (5, 0.25):
        method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top), 2)
        valid = valid_cols.unsqueeze(1).expand(B, HKV, L)
        pos = torch.arange(L).expand(B, HKV, L)
        mass = method.accumulate(queries, keys, pos, valid, torch.arange(L), valid_cols, SCALING)
        plan = method.prefill_keep_scored(0, valid, mass)
        at_once = method.prefill_keep(0, keys, valid, queries, valid_cols, SCALING)   # the engine's entry
        assert torch.equal(at_once[0], plan[0]) and torch.equal(at_once[1], plan[1])
        with pytest.raises(ValueError, match="every prompt query"):
            method.prefill_keep(0, keys, valid, queries[:, :, -W:], valid_cols[:, -W:], SCALING)
        kept = kept_sets(plan, valid)
        acc = {}
        for b in range(B):
            real = real_cols(b)
            for h in range(HKV):
                acc[b, h] = {j: 0.0 for j in real}
                for i in real:
                    cols = [j for j in real if j <= i]
                    for g in range(G):
                        logits = torch.tensor([float(queries[b, h * G + g, i].double() @ keys[b, h, j].double())
                                               * SCALING for j in cols], dtype=torch.float64)
                        for j, p in zip(cols, torch.softmax(logits, 0).tolist()):
                            acc[b, h][j] += p
                for j in real:
                    assert abs(float(mass[b, h, j]) - acc[b, h][j]) < 1e-4
                assert_sink_top_recent(kept[b, h], real, acc[b, h], SINK, RECENT, top_of(top, len(real)))
        # decode: a new token with score 0.5 joins; each row keeps its budget (the lowest middle token leaves)
        budget = method.row_budget(valid)
        assert budget.tolist() == [SINK + RECENT + top_of(top, n) for n in LENGTHS]
        idx, ok = plan
        scores = torch.where(ok, mass.gather(-1, idx), torch.zeros(()))
        valid2 = torch.cat([ok, torch.ones(B, HKV, 1, dtype=torch.bool)], -1)
        scores2 = torch.cat([scores, torch.full((B, HKV, 1), 0.5)], -1)
        cols2 = torch.cat([idx, torch.full((B, HKV, 1), L)], -1)
        plan2 = method.decode_keep(0, valid2, scores2, budget)
        kept2 = kept_sets(plan2, valid2)
        for b in range(B):
            for h in range(HKV):
                live = [int(cols2[b, h, s]) for s in range(valid2.shape[-1]) if valid2[b, h, s]]
                sc = {int(cols2[b, h, s]): float(scores2[b, h, s]) for s in range(valid2.shape[-1])}
                got = {int(cols2[b, h, s]) for s in kept2[b, h]}
                k = int(budget[b]) - SINK - RECENT
                assert_sink_top_recent(got, live, sc, SINK, RECENT, k, ("decode", b, h))
                assert len(got) == min(len(live), int(budget[b]))


def selection_oracle(name):
    """OmniKV's decode selection: per query head, softmax of the current query over the candidates, max over all
    heads; the sparse layers read sinks + recent + a top-k (k: a count or a fraction of the row's length)."""
    cls = get_method(name)
    keys, queries, valid_cols = synthetic(5)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(B, H, L, generator=g) * 3
    lengths = valid_cols.sum(-1)
    for top in (5, 0.25):
        method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top,
                                      full_attn_layers="0,1", pool_kernel_size=1), 4)   # pooled: test_omnikv_pooling
        assert method.is_full(0) and method.is_observer(1) and not method.is_full(2) and not method.is_observer(0)
        idx, ok = method.select_decode(logits, valid_cols, lengths)
        assert idx.shape[1] == SINK + RECENT + top_of(top, L)      # output size fixed by the slot count only
        for b in range(B):
            real = real_cols(b)
            protected = set(real[:SINK]) | set(real[-RECENT:])
            cands = [j for j in real if j not in protected]
            scores = {}
            for j in cands:
                scores[j] = max(float(torch.softmax(logits[b, hq, cands].double(), 0)[cands.index(j)]) for hq in range(H))
            kept = set(idx[b][ok[b]].tolist())
            assert_sink_top_recent(kept, real, scores, SINK, RECENT, top_of(top, len(real)), (name, top, b))
    unlimited = cls(cls.config_class(num_top_tokens=1.0, full_attn_layers="0,1"), 4)
    assert unlimited.select_decode(logits, valid_cols, lengths) is None


def oracle_omnikv(name):
    selection_oracle(name)


def oracle_deltakv(name):
    """OmniKV's selection, plus the flush rule (a multiple of ``recent`` leaving between ``recent`` and
    ``2 * recent - 1`` raw tokens) and the rebuild choice (a top-k of the compressed tokens' scores)."""
    selection_oracle(name)
    cls = get_method(name)
    method = cls(cls.config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=5,
                                  full_attn_layers="0,1"), 4)
    for buffered in range(0, 5 * RECENT):
        count = method.flush_count(buffered)
        if buffered < 2 * RECENT:
            assert count == 0
        else:
            assert count % RECENT == 0 and RECENT <= buffered - count < 2 * RECENT
    scores = torch.randn(B, 20, generator=torch.Generator().manual_seed(7))
    picked = method.pick(scores, 20, 100)
    for b in range(B):
        chosen = set(picked[b].tolist())
        assert len(chosen) == 5 and min(scores[b, j] for j in chosen) >= max(
            scores[b, j] for j in range(20) if j not in chosen)
    assert method.pick(scores, 3, 100) is None                     # the budget covers every compressed token


ORACLES = {"streamingllm": oracle_streamingllm, "snapkv": oracle_snapkv, "pyramidkv": oracle_pyramidkv,
           "knorm": oracle_knorm, "omnikv": oracle_omnikv, "deltakv": oracle_deltakv, "h2o": oracle_h2o}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_matches_its_oracle(name):
    assert name in ORACLES, f"method {name!r} is registered but has no oracle here: add one to ORACLES"
    ORACLES[name](name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_interface_declared(name):
    """Each method declares its family's interface, its config and its budget rule."""
    cls = get_method(name)
    assert cls.name == name and cls.config_class.method_name == name
    family_base = {"evict": "EvictionMethod", "mask": "SelectionMethod", "compress": "CompressionMethod"}
    assert family_base[cls.family] in [base.__name__ for base in cls.__mro__]
    knobs = cls.knobs_for_budget(0.1, 2000)
    cls.config_class.from_dict(knobs)                                # the budget's knobs are valid for the method
    assert sum(knobs.get(k, 0) for k in ("num_sink_tokens", "num_recent_tokens", "num_top_tokens")) == 200


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "knorm"])
def test_selection_scope_knob_is_checked(name):
    cls = get_method(name)
    assert cls.config_class().selection_scope == "layer"            # chosen by the H200 accuracy run (docs/accuracy.md)
    with pytest.raises(ValueError, match="selection_scope='group'.*'kv_head', 'layer'"):
        cls.config_class(selection_scope="group")


def test_layer_scope_needs_heads_with_the_same_slots():
    keys, _, valid_cols = synthetic(2)
    valid = valid_cols.unsqueeze(1).expand(B, HKV, L).clone()
    valid[0, 1, -1] = False
    method = get_method("knorm")(get_method("knorm").config_class(num_sink_tokens=SINK, num_recent_tokens=RECENT,
                                                                 num_top_tokens=3, selection_scope="layer"), 2)
    with pytest.raises(ValueError, match="same slots"):
        method.prefill_keep(0, keys, valid, None, None, SCALING)
