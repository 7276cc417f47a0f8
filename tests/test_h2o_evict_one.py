"""H2O's steady-state decode eviction (one token out per row, layer and KV head, static shapes) against the general
rule it replaces: :func:`select_keep` through ``H2O.decode_keep`` on the same tokens in logical order.

- the rule (``H2O.decode_evict_one`` / :func:`lowest_candidate`): tied, signed-zero and NaN scores, tokens in any
  slot order, batched rows of different budgets and lengths;
- the engine pool (:meth:`ScoredKVPool.evict_one` + :meth:`ScoredKVPool.push_decode_slots`): the tokens each row and
  head keeps (positions, K, V, scores) equal what ``decode_keep`` + :meth:`ScoredKVPool.keep_rows` keep, rows under
  their budget are untouched, and the pool's free stacks stay whole."""

import numpy as np
import pytest
import torch

from sparse_hf.engine.scored_pool import ScoredKVPool
from sparse_hf.methods.h2o import H2O, H2OConfig
from sparse_hf.methods.selection import lowest_candidate, select_keep
from test_attention_mass import needs_triton

SINK, RECENT = 2, 3


def _method(top=4, normalization="sum"):
    return H2O(H2OConfig(num_sink_tokens=SINK, num_recent_tokens=RECENT, num_top_tokens=top,
                         score_normalization=normalization), 2)


def _row_positions(g, budget, newest):
    """Sorted positions of a row holding ``budget + 1`` tokens whose newest is ``newest``: the sinks, the recent
    tokens and a random subset of the middle (what steady-state H2O leaves)."""
    middle = torch.arange(SINK, newest - RECENT + 1)
    pick = middle[torch.randperm(len(middle), generator=g)[:budget + 1 - SINK - RECENT]].sort().values
    return torch.cat([torch.arange(SINK), pick, torch.arange(newest - RECENT + 1, newest + 1)])


def _scores(g, shape, kind):
    if kind == "ties":                                  # few distinct values: many ties at the minimum
        return torch.randint(0, 3, shape, generator=g).float() / 4
    s = torch.rand(shape, generator=g)
    if kind == "signed":                                # -0.0 ties +0.0; NaN ranks above everything
        s = torch.where(torch.rand(shape, generator=g) < 0.3, torch.tensor(-0.0), s)
        s = torch.where(torch.rand(shape, generator=g) < 0.3, torch.tensor(0.0), s)
        s = torch.where(torch.rand(shape, generator=g) < 0.2, torch.tensor(float("nan")), s)
    return s


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["random", "ties", "signed"])
@pytest.mark.parametrize("seed", range(6))
def test_evict_one_drops_what_decode_keep_drops(kind, seed, normalization):
    """Rows of different budgets (so different lengths), 3 KV heads each with its own tokens; columns shuffled
    (the engine's slots after earlier evictions); padded to the longest row."""
    g = torch.Generator().manual_seed(seed)
    method = _method(normalization=normalization)
    budgets = [SINK + RECENT + t for t in (1, 4, 9)]
    Hkv, W = 3, max(budgets) + 1
    pos = torch.zeros(len(budgets), Hkv, W, dtype=torch.long)
    live = torch.zeros(len(budgets), Hkv, W, dtype=torch.bool)
    newest = torch.tensor([30, 17, 41])
    for b, budget in enumerate(budgets):
        for h in range(Hkv):
            pos[b, h, :budget + 1] = _row_positions(g, budget, int(newest[b]))
            live[b, h, :budget + 1] = True
    scores = _scores(g, pos.shape, kind)
    perm = torch.stack([torch.randperm(W, generator=g) for _ in range(len(budgets) * Hkv)]).view(pos.shape)
    # padding columns are moved along with the shuffle, so a row's live tokens lie anywhere in its columns
    col, found = method.decode_evict_one(scores.gather(-1, perm), pos.gather(-1, perm), newest.view(-1, 1, 1),
                                         live.gather(-1, perm))
    assert found.all()
    dropped = pos.gather(-1, perm).gather(-1, col.unsqueeze(-1))[..., 0]                  # [B, Hkv] positions
    for b, budget in enumerate(budgets):                 # the general rule, one row at a time (slots in order)
        n = budget + 1
        idx, ok = method.decode_keep(0, live[b:b + 1, :, :n], scores[b:b + 1, :, :n], torch.tensor([budget]),
                                     positions=pos[b:b + 1, :, :n])
        assert ok.all() and idx.shape[-1] == budget
        for h in range(Hkv):
            gone = set(range(n)) - set(idx[0, h].tolist())
            assert len(gone) == 1
            assert int(pos[b, h, gone.pop()]) == int(dropped[b, h]), (b, h)


def test_mean_normalization_needs_positions():
    method = _method(normalization="mean")
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="positions"):
        method.decode_keep(0, valid, torch.rand(1, 1, 12), torch.tensor([SINK + RECENT + 1]))


def test_lowest_candidate_rules():
    scores = torch.tensor([[0.5, 0.25, 0.25, 0.75, 0.25], [float("nan"), -0.0, 0.0, 1.0, float("inf")],
                           [0.1, 0.2, 0.3, 0.4, 0.5]])
    order = torch.tensor([[0, 5, 9, 2, 7], [0, 4, 3, 2, 1], [0, 1, 2, 3, 4]])
    cand = torch.tensor([[True] * 5, [True] * 5, [False] * 5])
    idx, found = lowest_candidate(scores, order, cand)
    assert idx[:2].tolist() == [2, 1]                    # tie at 0.25: the latest (order 9); -0.0 == 0.0: order 4
    assert found.tolist() == [True, True, False]
    only_nan = torch.tensor([[float("nan"), float("nan"), 1.0]])
    assert lowest_candidate(only_nan, torch.tensor([[1, 2, 0]]), torch.tensor([[True, True, False]]))[0].item() == 1


def _pool(rows_lens, Hkv=2, layers=3, seed=0, dtype=torch.float32):
    """A scored pool whose rows (of the given lengths) hold random K/V/scores and logical positions, as after
    earlier decode evictions (positions with gaps; column order shuffled)."""
    g = torch.Generator().manual_seed(seed)
    pool = ScoredKVPool(num_layers=layers, num_kv_heads=Hkv, head_dim=4, num_slots=128, max_rows=4, max_len=32,
                        per_layer_groups=True, dtype=dtype, device=torch.device("cpu"))
    rows = list(range(len(rows_lens)))
    pool.allocate(rows, rows_lens)
    pool.k_all.copy_(torch.randn(pool.k_all.shape, generator=g))
    pool.v_all.copy_(torch.randn(pool.v_all.shape, generator=g))
    pool.scores.copy_(torch.randint(0, 4, pool.scores.shape, generator=g).float())    # ties
    newest = []
    for r, n in enumerate(rows_lens):
        top = n + 7
        newest.append(top)
        for layer in range(layers):
            slots = pool.tables[layer, r, :n].long()
            for h in range(Hkv):
                p = _row_positions(g, n - 1, top)
                pool.pos[layer, slots, h] = p[torch.randperm(n, generator=g)].int()
    return pool, rows, torch.tensor(newest)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("seed", range(4))
def test_pool_evict_one_keeps_what_decode_keep_keeps(seed, normalization):
    """Rows 0 and 2 are over their budgets (9 and 13 tokens for budgets 8 and 12), row 1 is under (7 of 10)."""
    lens, budgets = [9, 7, 13], [8, 10, 12]
    pool, rows, newest = _pool(lens, seed=seed)
    method = _method(top=3, normalization=normalization)    # the budgets come from the caller (the engine's)
    before = {name: t.clone() for name, t in (("k", pool.k_all), ("v", pool.v_all), ("s", pool.scores),
                                              ("p", pool.pos))}
    W = max(lens)
    L, Hkv = pool.num_layers, pool.num_kv_heads
    tables = pool.tables[:, :3, :W]
    lens_dev = torch.tensor(lens, dtype=torch.int32).expand(L, 3)
    over = torch.tensor(lens) > torch.tensor(budgets)
    new_slots = tables.gather(2, (lens_dev.long() - 1).unsqueeze(-1))[..., 0]      # [L, B] the newest tokens' slots
    top_before = list(pool.free_top)
    pool.evict_one(method, tables, lens_dev, newest, over)
    pool.push_decode_slots(new_slots, over, int(over.sum()))
    assert pool.free_top == [t + 2 for t in top_before]
    for layer in range(L):
        freed = set(pool.free[layer, top_before[layer]: pool.free_top[layer]].tolist())
        assert freed == {int(new_slots[layer, 0]), int(new_slots[layer, 2])}
    for r, (n, budget) in enumerate(zip(lens, budgets)):
        keep = budget if n > budget else n
        for layer in range(L):
            slots = pool.tables[layer, r, :n].long()
            p, s = before["p"][layer, slots].T.long(), before["s"][layer, slots].T             # [Hkv, n]
            order = p.argsort(-1)                                                         # logical order
            valid = torch.ones(1, Hkv, n, dtype=torch.bool)
            plan = method.decode_keep(layer, valid, s.gather(-1, order).unsqueeze(0), torch.tensor([budget]),
                                      positions=p.gather(-1, order).unsqueeze(0))
            for h in range(Hkv):
                want = order[h] if plan is None else order[h][plan[0][0, h]]              # kept columns
                got = pool.tables[layer, r, :keep].long()                                 # slots after eviction
                want_pos = sorted(p[h, want].tolist())
                assert sorted(pool.pos[layer, got, h].tolist()) == want_pos, (r, layer, h)
                by_pos = {int(pool.pos[layer, sl, h]): sl for sl in got.tolist()}
                for c in want.tolist():          # each kept token's K, V and score, wherever it now lies
                    sl = by_pos[int(p[h, c])]
                    for name, buf in (("k", pool.k_all), ("v", pool.v_all), ("s", pool.scores)):
                        assert torch.equal(buf[layer, sl, h], before[name][layer, slots[c], h]), (name, r, layer, h)
    for r in rows:
        pool.lens[:, r] = np.minimum(pool.lens[:, r], budgets[r])
        pool.release_row(r)
    pool.check_whole()


@needs_triton
@pytest.mark.parametrize("dtype,block,special", [(torch.float32, None, False), (torch.bfloat16, 4, True),
                                                 (torch.float32, 8, True)])
def test_triton_evict_one_equals_torch_path(dtype, block, special, monkeypatch):
    """The one-launch Triton eviction (interpreted on CPU) against the pool's torch path: every K, V, score and
    position of every slot equal afterwards; rows over and under budget; table blocks smaller than a row (the
    kernel's loop), tied, signed-zero and NaN scores."""
    from sparse_hf.kernels import evict_one as kernel_module

    if block is not None:
        monkeypatch.setattr(kernel_module, "EVICT_BLOCK", block)
    lens, budgets = [9, 7, 13], [8, 10, 12]
    method = _method(top=3)
    out = []
    for backend in ("torch", "triton"):
        pool, rows, newest = _pool(lens, Hkv=3, seed=7, dtype=dtype)
        if special:
            r = torch.rand(pool.scores.shape, generator=torch.Generator().manual_seed(1))
            pool.scores[r < 0.2] = -0.0
            pool.scores[(r >= 0.2) & (r < 0.3)] = float("nan")
        before = pool.pos.clone()
        W = max(lens)
        tables = pool.tables[:, :3, :W].contiguous()
        lens_dev = torch.tensor(lens, dtype=torch.int32).expand(pool.num_layers, 3)
        over = torch.tensor(lens) > torch.tensor(budgets)
        pool.evict_one(method, tables, lens_dev, newest, over, backend=backend)
        assert not torch.equal(pool.pos, before)                       # something moved
        out.append(pool)
    a, b = out
    real = slice(0, a.scratch_slot)                  # the torch path writes garbage to the scratch slot, Triton none
    for name in ("k_all", "v_all", "pos"):
        assert torch.equal(getattr(a, name)[:, real], getattr(b, name)[:, real]), name
    assert torch.equal(a.scores[:, real].nan_to_num(123.0), b.scores[:, real].nan_to_num(123.0))
