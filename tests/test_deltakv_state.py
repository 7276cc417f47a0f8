"""The core DeltaKV state on synthetic tensors (no model, no Transformers): ``flush``/``rebuild`` against a plain
per-row float64 loop, rows independent of each other, and exact round trips with an identity compressor."""

import math

import pytest
import torch

from sparse_hf.deltakv.projections import DeltaKVProjections
from sparse_hf.deltakv.state import Clustering, CompressedState, all_offsets, flush, rebuild, rebuild_kv

KV_HEADS, HEAD_DIM = 2, 4
DX = 2 * KV_HEADS * HEAD_DIM


def projections(identity=False, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    p = DeltaKVProjections(num_layers=1, kv_heads=KV_HEADS, head_dim=HEAD_DIM, latent=DX if identity else 6,
                           layer_indices=[0], bias=not identity).to(dtype)
    if identity:
        with torch.no_grad():
            p.layers["0"].down.weight.copy_(torch.eye(DX))
            p.layers["0"].up.weight.copy_(torch.eye(DX))
    return p


def run_flushes(x_rows, schedule, cl, proj):
    """Flush rows of different lengths by ``schedule`` (a list of per-row counts per flush). ``x_rows[b]`` is row
    b's token stream ``[T_b, Dx]`` (sinks first); positions are 0..T_b-1. Returns the state."""
    B = len(x_rows)
    state = CompressedState(B, cl)
    S = cl.num_sink
    for counts in schedule:
        C = max(counts)
        x = torch.zeros(B, C, DX, dtype=torch.float64)
        pos = torch.zeros(B, C, dtype=torch.long)
        for b, c in enumerate(counts):
            start = S + state.counts[b]
            x[b, :c] = x_rows[b][start:start + c]
            pos[b, :c] = torch.arange(start, start + c)
        sinks = None
        if state.needs_sinks(counts):
            sinks = (torch.stack([r[:S] for r in x_rows]), torch.arange(S).expand(B, S))
        flush(state, x, pos, counts, proj, 0, sinks)
    return state


def naive_rebuild(row, n, cl, proj):
    """Per-row float64 loop: token ``S + j`` (j < n) as DeltaKV stores and rebuilds it."""
    S, step = cl.num_sink, cl.step
    centers = list(range(S)) + [S + j for j in range(0, n, step)]
    out = []
    for j in range(n):
        t = S + j
        if j % step == 0:
            out.append(row[t])
            continue
        visible = [c for c in centers if c <= t]
        x = row[t]
        if cl.metric == "l2":
            score = [-(x - row[c]).pow(2).sum().item() for c in visible]
        else:
            score = [torch.nn.functional.cosine_similarity(x, row[c], dim=0).item() for c in visible]
        best = sorted(range(len(visible)), key=lambda i: -score[i])[:cl.neighbor_count]
        ref = torch.stack([row[visible[i]] for i in best]).mean(0)
        latent = proj.down(0, x) - proj.down(0, ref)
        out.append(proj.up(0, latent) + ref)
    return torch.stack(out)


SCHEDULE = [[8, 0, 4], [4, 8, 0], [0, 4, 8]]     # rows flush at different times and by different counts


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_flush_and_rebuild_match_a_per_row_loop(metric):
    cl = Clustering(num_sink=3, step=3, neighbor_count=2, metric=metric)
    proj = projections()
    torch.manual_seed(1)
    rows = [torch.randn(40, DX, dtype=torch.float64) for _ in range(3)]
    state = run_flushes(rows, SCHEDULE, cl, proj)
    assert state.counts == [12, 12, 12]
    pick, ok = all_offsets(state)
    x, pos = rebuild(state, pick, proj, 0)
    for b in range(3):
        n = state.counts[b]
        torch.testing.assert_close(x[b, :n], naive_rebuild(rows[b], n, cl, proj), atol=1e-10, rtol=1e-10)
        assert pos[b, :n].tolist() == list(range(3, 3 + n))


def test_rows_do_not_depend_on_each_other():
    cl = Clustering(num_sink=2, step=4, neighbor_count=1, quant_bits=8)
    proj = projections(dtype=torch.float32)
    torch.manual_seed(2)
    rows = [torch.randn(60, DX, dtype=torch.float64) for _ in range(3)]
    schedule = [[16, 0, 8], [8, 16, 0], [0, 8, 8]]
    batch = run_flushes(rows, schedule, cl, proj)
    pick = torch.tensor([[0, 5, 17, 23], [3, 1, 9, 20], [2, 15, 4, 11]])
    xb, pb = rebuild(batch, pick, proj, 0)
    for b in range(3):
        alone = run_flushes([rows[b]], [[s[b]] for s in schedule if s[b]], cl, proj)
        assert alone.counts == [batch.counts[b]]
        xa, pa = rebuild(alone, pick[b:b + 1], proj, 0)
        torch.testing.assert_close(xb[b], xa[0])
        assert torch.equal(pb[b], pa[0])
    assert batch.fathers.dtype == torch.int16 and batch.latent.codes.dtype == torch.int8


def test_identity_compressor_round_trips_and_rebuild_kv_applies_rope():
    cl = Clustering(num_sink=2, step=2, neighbor_count=2)
    proj = projections(identity=True)
    torch.manual_seed(3)
    rows = [torch.randn(30, DX, dtype=torch.float64) for _ in range(2)]
    state = run_flushes(rows, [[8, 4], [4, 0]], cl, proj)
    pick, ok = all_offsets(state)
    x, _ = rebuild(state, pick, proj, 0)
    for b, n in enumerate(state.counts):
        torch.testing.assert_close(x[b, :n], rows[b][2:2 + n], atol=1e-12, rtol=0)
    assert ok.sum(-1).tolist() == state.counts

    def rope(like, pos):                       # the HF rotate-half convention, as a model's rotary embedding
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
        ang = pos.double().unsqueeze(-1) * inv
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin()

    keys, values, pos = rebuild_kv(state, pick, proj, 0, KV_HEADS, HEAD_DIM, rope)
    k = x[..., :KV_HEADS * HEAD_DIM].view(2, -1, KV_HEADS, HEAD_DIM)
    cos, sin = rope(None, pos)
    for b in range(2):
        for j in range(state.counts[b]):
            for h in range(KV_HEADS):
                v = k[b, j, h]
                rotated = torch.cat([-v[HEAD_DIM // 2:], v[:HEAD_DIM // 2]])
                want = v * cos[b, j] + rotated * sin[b, j]
                torch.testing.assert_close(keys[b, h, j], want)
    assert values.shape == (2, KV_HEADS, pick.shape[1], HEAD_DIM)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="cluster_metric"):
        Clustering(num_sink=2, step=2, metric="manhattan")
    state = CompressedState(2, Clustering(num_sink=2, step=2))
    with pytest.raises(ValueError, match="pass their sinks"):
        flush(state, torch.zeros(2, 4, DX), torch.zeros(2, 4, dtype=torch.long), [4, 0], projections(), 0)
    with pytest.raises(ValueError, match="do not fit"):
        flush(state, torch.zeros(2, 4, DX), torch.zeros(2, 4, dtype=torch.long), [5, 0], projections(), 0)
    assert Clustering(num_sink=2, step=3).num_centers(7) == 2 + math.ceil(7 / 3)


def test_nearest_centers_blockwise_equals_one_shot_with_bounded_scores(monkeypatch):
    from sparse_hf.deltakv import clustering

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, DX, generator=g, dtype=torch.float64)
    centers = torch.randn(2, 12, DX, generator=g, dtype=torch.float64)
    center_pos = torch.arange(0, 48, 4).expand(2, 12).clone()
    center_pos[1, -2:] = -1                                     # not filled yet
    token_pos = torch.arange(50).expand(2, 50)
    valid = center_pos >= 0
    for metric in ("l2", "cosine"):
        want = clustering.nearest_centers(x, centers, token_pos, center_pos, 3, metric, valid)
        shapes = []
        scores = clustering.center_scores
        monkeypatch.setattr(clustering, "center_scores", lambda a, b, m: shapes.append(a.shape[-2] * b.shape[-2])
                            or scores(a, b, m))
        got = clustering.nearest_centers(x, centers, token_pos, center_pos, 3, metric, valid, block=7,
                                         visible_prefix=lambda i, j: -(-j // 4))   # centers at 0, 4, 8, ...
        monkeypatch.setattr(clustering, "center_scores", scores)
        assert torch.equal(got, want)
        assert max(shapes) <= 7 * 12 and sum(shapes) < 0.65 * 50 * 12   # blocks, and ~half of N * M (causal)


def test_a_flush_searches_block_by_block_with_the_same_fathers(monkeypatch):
    from sparse_hf.deltakv import clustering

    cl = Clustering(num_sink=2, step=3, neighbor_count=2, metric="l2")
    proj = projections()
    torch.manual_seed(4)
    rows = [torch.randn(80, DX, dtype=torch.float64) for _ in range(2)]
    want = run_flushes(rows, [[40, 25], [12, 30]], cl, proj)
    monkeypatch.setattr(clustering, "SCORE_BLOCK", 40)              # a few tokens per block
    got = run_flushes(rows, [[40, 25], [12, 30]], cl, proj)
    assert torch.equal(got.fathers, want.fathers) and torch.equal(got.latent.codes, want.latent.codes)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_give_the_fp32_fathers(metric, dtype, monkeypatch):
    # one half-precision GEMM with fp32 accumulation and output: exact products, fp32 sums (only their order
    # differs from the fp32 GEMM), so the fathers are the fp32 path's (but for exact near-ties)
    from sparse_hf.deltakv import clustering

    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, M, D = 2, 4000, 400, 256
    x = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
    centers = torch.randn(B, M, D, device="cuda", generator=g).to(dtype)
    token_pos = torch.arange(N, device="cuda").expand(B, N)
    center_pos = (torch.arange(M, device="cuda") * 10).expand(B, M)
    fast = clustering.nearest_centers(x, centers, token_pos, center_pos, 2, metric, block=1000)
    assert clustering._half_gemm_ok is True                       # the half GEMM did run
    monkeypatch.setattr(clustering, "HALF_GEMM_SCORES", False)
    slow = clustering.nearest_centers(x, centers, token_pos, center_pos, 2, metric, block=1000)
    assert (fast == slow).float().mean() > 0.999
    assert torch.equal(fast[..., 0] == -1, slow[..., 0] == -1)


def test_one_father_reference_is_the_general_mean():
    # k = 1 takes a shortcut (the father itself, zeros without one): the same values as the weighted mean
    from sparse_hf.deltakv.clustering import reference_from_fathers
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        centers = torch.randn(2, 9, 16, generator=g).to(dtype)
        fathers = torch.randint(-1, 9, (2, 20, 1), generator=g)
        fathers[0, 0] = -1
        valid = fathers >= 0
        gathered = centers.gather(1, fathers.clamp(min=0).expand(-1, -1, 16)).unsqueeze(2)
        want = (gathered * valid.to(dtype).unsqueeze(-1)).sum(2) / valid.sum(-1, keepdim=True).clamp(min=1).to(dtype)
        got = reference_from_fathers(centers, fathers)
        assert torch.equal(got, want) and not got[0, 0].any()
