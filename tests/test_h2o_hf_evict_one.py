"""The HF path's steady-state H2O decode eviction (``ScoredSlotLayer.steady``: ``H2O.decode_evict_one_in_order`` +
``ScoredSlotLayer.drop_one``) against the general one it replaces there (``H2O.decode_keep`` + ``keep``):

- the rule: on slots in logical order with empty slots anywhere (left padding, earlier evictions), rows of different
  budgets, tied / signed-zero / NaN scores, it drops the token ``decode_keep`` drops;
- step by step in a model: left-padded batches with per-row budgets (and, rounded scores, many ties), the caches'
  slots (positions, scores, keys) and the logits equal the general path's after every decode step, and the steady
  path is really taken;
- the steady step reads nothing back from the device (spied like tests/test_engine_h2o.py)."""

import pytest
import torch

from sparse_hf.hf.scored_layer import ScoredSlotLayer
from sparse_hf.methods.h2o import H2O, H2OConfig
from helpers import greedy, left_padded_batch, spy_device_reads, tiny_model
from test_h2o_evict_one import _scores

SINK, RECENT = 2, 3


@pytest.mark.parametrize("kind", ["random", "ties", "signed"])
@pytest.mark.parametrize("seed", range(6))
def test_in_order_rule_drops_what_decode_keep_drops(kind, seed):
    """3 rows of different budgets x 2 KV heads; each row's ``budget + 1`` tokens sit in increasing slots among
    empty ones (leading padding, gaps), as in an HF layer."""
    g = torch.Generator().manual_seed(seed)
    method = H2O(H2OConfig(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=4), 2)
    budgets = torch.tensor([SINK + RECENT + t for t in (0, 4, 9)])
    Hkv, L = 2, 24
    valid = torch.zeros(len(budgets), Hkv, L, dtype=torch.bool)
    for b, budget in enumerate(budgets.tolist()):
        for h in range(Hkv):
            lead = int(torch.randint(0, L - budget - 1, (1,), generator=g))      # left padding
            slots = lead + torch.randperm(L - lead, generator=g)[:budget + 1]
            valid[b, h, slots] = True
    scores = _scores(g, valid.shape, kind)
    # select_keep ranks a NaN candidate above the protected tokens (inf), so with more NaN candidates than the
    # row's top it drops a sink or recent token: a quirk of the general rule on NaN scores that the one-token rule
    # (which never drops a protected token) does not copy. Keep at most one NaN per row, none where top is 0.
    nan = torch.isnan(scores)
    extra = nan & ((nan.long().cumsum(-1) > 1) | (budgets == SINK + RECENT).view(-1, 1, 1))
    scores = torch.where(extra, torch.tensor(0.25), scores)
    idx, found = method.decode_evict_one_in_order(scores, valid)
    assert found.all()
    keep, ok = method.decode_keep(0, valid, scores, budgets)
    kept = torch.zeros(*valid.shape[:2], L + 1, dtype=torch.bool)           # fillers go to column L
    kept = kept.scatter(-1, torch.where(ok, keep, L), ok)[:, :, :L]
    dropped = valid & ~kept
    assert (dropped.sum(-1) == 1).all()
    assert torch.equal(dropped.long().argmax(-1), idx)


def _cache_after_prompt(model, ids, mask, knobs):
    out = greedy(model, ids, mask, new_tokens=1, cache_implementation="h2o", cache_config=knobs,
                 return_dict_in_generate=True)
    pad = (mask == 0).sum(-1, keepdim=True)
    return out.past_key_values, out.sequences[:, -1:], out.sequences.shape[1] - 1 - pad


def _count_steady(cache):
    calls = []
    for layer in cache.layers:
        inner = layer.drop_one

        def counted(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)
        layer.drop_one = counted
    return calls


@pytest.mark.parametrize("scores", ["exact", "floor", "zero"])
@pytest.mark.parametrize("knobs", [dict(num_sink_tokens=2, num_recent_tokens=3, num_top_tokens=5),
                                   dict(num_sink_tokens=1, num_recent_tokens=4, num_top_tokens=0.3),
                                   dict(num_sink_tokens=0, num_recent_tokens=1, num_top_tokens=0),
                                   dict(num_sink_tokens=2, num_recent_tokens=3, num_top_tokens=5,
                                        score_normalization="mean")])
def test_steady_steps_equal_the_general_path_step_by_step(knobs, scores, monkeypatch):
    """Left-padded rows of different lengths (with a fractional top, different budgets); ``round_scores`` makes
    the accumulated masses coarse: ``floor`` (some exact ties), ``zero`` (every candidate ties, so the tie rule picks
    every evicted token). After every decode step the two caches hold the same slots."""
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch((33, 19, 26), seed=3)
    if scores != "exact":
        coarse = torch.floor if scores == "floor" else torch.zeros_like
        original = H2O.accumulate
        monkeypatch.setattr(H2O, "accumulate", lambda self, *a, **k: coarse(original(self, *a, **k)))
    ref, token, pos = _cache_after_prompt(model, ids, mask, knobs)
    new, _, _ = _cache_after_prompt(model, ids, mask, knobs)
    steady = _count_steady(new)
    with torch.inference_mode():
        for step in range(14):
            for layer in ref.layers:
                layer.steady = False                              # the reference always takes decode_keep
            a = model(input_ids=token, position_ids=pos + step, past_key_values=ref, use_cache=True).logits
            b = model(input_ids=token, position_ids=pos + step, past_key_values=new, use_cache=True).logits
            assert torch.equal(a, b), f"step {step}"
            for i, (x, y) in enumerate(zip(ref.layers, new.layers)):
                assert x.num_slots == y.num_slots, (step, i)
                assert torch.equal(x.positions, y.positions), (step, i)
                assert torch.equal(x.scores, y.scores), (step, i)
                live = x.positions >= 0
                assert torch.equal(x.keys[live], y.keys[live]), (step, i)
            token = a[:, -1:].argmax(-1)
    assert len(steady) >= 10 * len(new.layers)               # steady once every row is at its budget


def test_steady_step_reads_nothing_back_from_the_device(monkeypatch):
    """``item``/``bool``/``int``/``float``/``index``/``tolist``/``cpu``/``numpy`` (each waits for the device on CUDA)
    are never called inside ``maintain_layer`` of a steady layer, and every layer stays steady."""
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch((30, 17), seed=5)
    cache, token, pos = _cache_after_prompt(model, ids, mask, dict(num_sink_tokens=2, num_recent_tokens=3,
                                                                   num_top_tokens=0.4))
    assert all(layer.steady for layer in cache.layers)     # both prompts exceed their budgets: steady from step 1
    steady_calls = []
    calls = spy_device_reads(monkeypatch, cache, "maintain_layer",
                             before=lambda layer_idx: steady_calls.append(cache.layers[layer_idx].steady))
    budgets = [layer.row_budget.clone() for layer in cache.layers]
    with torch.inference_mode():
        for step in range(5):
            model(input_ids=token, position_ids=pos + step, past_key_values=cache, use_cache=True)
    monkeypatch.undo()
    assert calls == [] and len(steady_calls) == 5 * len(cache.layers) and all(steady_calls)
    for layer, budget in zip(cache.layers, budgets):                 # every row still holds exactly its budget
        assert torch.equal(layer.valid().sum(-1), budget.view(-1, 1).expand(-1, layer.valid().shape[1]))


def test_prompt_and_reorder_leave_the_steady_state():
    layer = ScoredSlotLayer()
    layer.steady = True
    layer.frozen = True
    k = torch.zeros(1, 1, 2, 4)
    layer.lazy_initialization(k, k)
    layer.update(k, k)                                   # a two-token forward (a later turn's prompt)
    assert not layer.steady


def test_second_turn_leaves_and_regains_the_steady_state(monkeypatch):
    """Two turns (the second prompt takes every row far over its budget: the general path, then steady again):
    tokens, logits and the final slots equal a run where every step takes the general path."""
    from sparse_hf.hf.cache import EvictionCache
    from test_multiturn import two_turns
    model = tiny_model("llama", layers=2)
    knobs = dict(num_sink_tokens=2, num_recent_tokens=3, num_top_tokens=4)
    steady = []
    inner = ScoredSlotLayer.drop_one

    def counted(self, *args):
        steady.append(self.seen)
        return inner(self, *args)
    monkeypatch.setattr(ScoredSlotLayer, "drop_one", counted)
    out = two_turns(model, output_logits=True, cache_implementation="h2o", cache_config=knobs)
    turn2_start = out.sequences.shape[1] - 5 - 1
    assert any(seen < turn2_start for seen in steady) and any(seen > turn2_start + 1 for seen in steady)
    general = EvictionCache.maintain_layer

    def always_general(self, layer_idx):
        self.layers[layer_idx].steady = False
        return general(self, layer_idx)
    monkeypatch.setattr(EvictionCache, "maintain_layer", always_general)
    ref = two_turns(model, output_logits=True, cache_implementation="h2o", cache_config=knobs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
    for x, y in zip(out.past_key_values.layers, ref.past_key_values.layers):
        assert torch.equal(x.positions, y.positions) and torch.equal(x.scores, y.scores)
