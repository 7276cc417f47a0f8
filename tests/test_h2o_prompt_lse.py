"""H2O's prompt mass from the log-sum-exp the prefill attention returns (one pass over ``q.k`` instead of two).

- ``attention_mass(..., lse=...)`` (torch and Triton under the interpreter) equals a float64 loop: GQA, chunks that
  see earlier slots, left padding, invalid queries whose ``lse`` is garbage, a slot table, the row-split merge;
- every source of that ``lse`` equals a float64 log-sum-exp: the paged prefill kernel (and its torch reference),
  the split route's merge of its two halves, the CPU's fused SDPA op, the HF path's ``attention_with_lse`` with
  HF's left-padded and chunk masks (its output is SDPA's);
- end to end, the HF path and the engine (each prefill route) give the same scores and tokens with the log-sum-exp
  as with the mass computing it itself (``lse=None``, the previous behaviour), for both score normalisations,
  left-padded batches and chunked prefill, and the log-sum-exp really is passed.
"""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import engine_tokens, random_prompts
from helpers import greedy, left_padded_batch, tiny_model
from sparse_hf.engine import LLM
from sparse_hf.kernels import sdpa_split
from sparse_hf.engine.scored_pool import ScoredPoolAttention
from sparse_hf.hf import cache as hf_cache
from sparse_hf.hf.attention import attention_with_lse
from sparse_hf.kernels import attention_mass, paged_prefill_attention
from sparse_hf.kernels.attention_lse import sdpa_with_lse_cpu
from test_attention_mass import float64_mass, make_case, needs_triton
from test_engine_prefill_routes import math_sdpa

KNOBS = dict(num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=6)


def float64_lse(queries, keys, key_pos, key_valid, query_pos, query_valid, scaling):
    """``[B, H, q]`` float32 log-sum-exp of each query over its allowed keys (float64 math); invalid queries get NaN
    (the mass must never read them)."""
    G = queries.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(G, 1)
    s = queries.double() @ k.transpose(-1, -2) * scaling                              # [B, H, q, L]
    allowed = (key_valid.repeat_interleave(G, 1).unsqueeze(2)
               & (key_pos.repeat_interleave(G, 1).unsqueeze(2) <= query_pos.view(1, 1, -1, 1)))
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1).float()
    if query_valid is not None:
        lse = lse.masked_fill(~query_valid.unsqueeze(1), float("nan"))
    return lse


CASES = [
    dict(),                                                          # G = 4, a chunk after 46 earlier slots
    dict(H=6, Hkv=2, q=70, L=70, offset=0),                          # a whole prompt, G = 3
    dict(B=3, H=4, Hkv=1, q=50, L=200, D=24, offset=100),            # keys after the last query
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_mass_from_the_attention_lse_equals_float64(kwargs, backend):
    case = make_case(**kwargs)
    lse = float64_lse(*case, 0.3)
    got = attention_mass(*case, 0.3, backend=backend, lse=lse)
    assert got.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got.double(), float64_mass(*case, 0.3), rtol=1e-4, atol=1e-5)


@needs_triton
def test_mass_from_lse_row_splits_and_slot_table():
    """The split-row merge of pass 2 and keys read in place through a slot table, with the given lse."""
    queries, keys, key_pos, key_valid, query_pos, query_valid = make_case(B=2, H=8, Hkv=2, q=40, L=96, offset=56)
    lse = float64_lse(queries, keys, key_pos, key_valid, query_pos, query_valid, 0.2)
    want = float64_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, 0.2)
    S = 260
    slots = torch.randperm(S - 1, generator=torch.Generator().manual_seed(4))[:192].view(2, 96)
    pool = torch.full((S, 2, 32), float("nan"))
    for b in range(2):
        pool[slots[b]] = keys[b].transpose(0, 1)
    slots = torch.where(key_valid[:, 0], slots, S - 1)
    view = pool.permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1)
    for row_split in (None, 64, 33):
        got = attention_mass(queries, view, key_pos, key_valid, query_pos, query_valid, 0.2, backend="triton",
                             slots=slots, row_split=row_split, lse=lse)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 2, 3)])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (6, 2)])                # G = 1, 2, 3
def test_mass_from_lse_small_tiles_strided_lse_and_slot_table(config, H, Hkv):
    """The given-lse path (pass 2 alone) at forced small tiles: G = 1/2/3, q = 37 and L = 83 not multiples of the
    tiles, padded queries whose lse is NaN, an lse with non-contiguous strides (``[B, q, H]`` storage, as a
    transposed attention output gives), and keys read through a slot table whose invalid slots are NaN."""
    queries, keys, key_pos, key_valid, query_pos, query_valid = make_case(B=2, H=H, Hkv=Hkv, q=37, L=83, D=16,
                                                                          offset=30)
    case = (queries, keys, key_pos, key_valid, query_pos, query_valid)
    want = float64_mass(*case, 0.3)
    lse = float64_lse(*case, 0.3).transpose(1, 2).contiguous().transpose(1, 2)        # [B, H, q], strided
    S = 200
    slots = torch.randperm(S - 1, generator=torch.Generator().manual_seed(6))[:166].view(2, 83)
    pool = torch.full((S, Hkv, 16), float("nan"))
    for b in range(2):
        pool[slots[b]] = keys[b].transpose(0, 1)
    slots = torch.where(key_valid[:, 0] & key_valid[:, -1], slots, S - 1)
    view = pool.permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1)
    valid = key_valid & key_valid[:, :1] & key_valid[:, -1:]                         # the NaN slot is never valid
    want_slots = float64_mass(queries, keys, key_pos, valid, query_pos, query_valid, 0.3)
    lse_slots = float64_lse(queries, keys, key_pos, valid, query_pos, query_valid, 0.3)
    for row_split in (None, 19):
        got = attention_mass(*case, 0.3, backend="triton", lse=lse, config=config, row_split=row_split)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        got = attention_mass(queries, view, key_pos, valid, query_pos, query_valid, 0.3, backend="triton",
                             slots=slots, lse=lse_slots, config=config, row_split=row_split)
        torch.testing.assert_close(got.double(), want_slots, rtol=1e-4, atol=1e-5)


def test_lse_of_the_wrong_shape_is_an_error():
    case = make_case(q=5, L=20)
    with pytest.raises(ValueError, match="lse must be"):
        attention_mass(*case, 0.3, lse=torch.zeros(2, 8, 4))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_paged_prefill_writes_each_query_lse(backend):
    """Two rows' chunks packed in one call (a first chunk and a chunk after 37 earlier slots), small tiles."""
    g = torch.Generator().manual_seed(5)
    H, Hkv, D, S = 6, 2, 16, 200
    k, v = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    tables = torch.stack([torch.randperm(S, generator=g)[:80] for _ in range(2)]).int()
    segments = [(0, 0, 21, 21), (1, 21, 19, 56)]
    q = torch.randn(40, H, D, generator=g)
    lse = torch.full((41, H), 7.0)[:40]                          # a strided-free view; untouched rows stay 7
    paged_prefill_attention(q, k, v, tables, segments, 0.3, backend, config=(16, 16, 4, 2), lse=lse)
    for row, start, n, context in segments:
        keys = k[tables[row, :context].long()].double().repeat_interleave(H // Hkv, 1)          # [C, H, D]
        s = torch.einsum("nhd,chd->hnc", q[start: start + n].double(), keys) * 0.3
        seen = torch.arange(context).view(1, -1) <= torch.arange(n).view(-1, 1) + context - n
        want = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1).T                      # [n, H]
        torch.testing.assert_close(lse[start: start + n].double(), want, rtol=1e-5, atol=1e-5)


def test_split_route_merges_the_halves_lse(monkeypatch):
    monkeypatch.setattr(sdpa_split, "_call", math_sdpa)
    monkeypatch.setattr(sdpa_split, "_working", {})
    g = torch.Generator().manual_seed(6)
    q = torch.randn(7, 6, 16, generator=g)
    k, v = torch.randn(19, 2, 16, generator=g), torch.randn(19, 2, 16, generator=g)
    out, lse = sdpa_split.split_chunk_attention(q, k[:12], v[:12], k[12:], v[12:], 0.3, return_lse=True)
    assert torch.equal(out, sdpa_split.split_chunk_attention(q, k[:12], v[:12], k[12:], v[12:], 0.3))
    s = torch.einsum("nhd,chd->hnc", q.double(), k.double().repeat_interleave(3, 1)) * 0.3
    seen = torch.arange(19).view(1, -1) <= torch.arange(7).view(-1, 1) + 12
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1).T,
                               rtol=1e-5, atol=1e-5)
    _, first = sdpa_split.split_chunk_attention(q, k[:0], v[:0], k[:7], v[:7], 0.3, return_lse=True)
    s = s[..., :7].masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(first.double(), torch.logsumexp(s, -1).T, rtol=1e-5, atol=1e-5)


def hf_masks(B=2, q=9, n=21, pad=(0, 5)):
    """HF-style ``[B, 1, q, n]`` bool masks of a chunk (the last ``q`` of ``n`` columns) with left padding."""
    cols = torch.arange(n)
    causal = cols.view(1, -1) <= torch.arange(n - q, n).view(-1, 1)
    real = torch.stack([cols >= p for p in pad])                                          # [B, n]
    return (causal.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)


@pytest.mark.parametrize("q,n", [(9, 21), (21, 21)])
def test_hf_attention_with_lse_is_sdpa_plus_the_lse(q, n):
    """Left padding (row 1), a later chunk (``q < n``) and a whole prompt; the mask as bool and as eager's additive
    float; and no mask (a whole unpadded prompt: causal)."""
    g = torch.Generator().manual_seed(7)
    query, key, value = torch.randn(2, 6, q, 8, generator=g), torch.randn(2, 2, n, 8, generator=g), \
        torch.randn(2, 2, n, 8, generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    mask = hf_masks(q=q, n=n)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in ([mask, additive, None] if q == n else [mask, additive]):
        want, _ = sdpa_attention_forward(module, query, key, value, m, scaling=0.3)
        out, lse = attention_with_lse(query, key, value, m, 0.3)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        allowed = (mask if m is not None else torch.ones(q, n, dtype=torch.bool).tril()).expand(2, 1, q, n)
        s = query.double() @ key.double().repeat_interleave(3, 1).transpose(-1, -2) * 0.3
        ref = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
        real = allowed.any(-1).expand_as(ref)                                                    # padding queries
        torch.testing.assert_close(lse.double()[real], ref[real], rtol=1e-5, atol=1e-5)


def test_cpu_fused_op_refuses_what_it_cannot_run():
    q = torch.randn(1, 2, 3, 8)
    assert sdpa_with_lse_cpu(q, q.double(), q.double(), 0.3) is None                       # mixed dtypes


def test_causal_attention_with_lse_names_the_kernel_it_ran(monkeypatch):
    """A whole causal prompt: on the CPU torch's flash op, equal to a float64 log-sum-exp; off the CPU cuDNN first and,
    where cuDNN refuses (fp32), the memory-efficient kernel (the order checked with stand-ins on the meta device)."""
    import sparse_hf.kernels.attention_lse as attention_lse

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 6, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8)
    out, lse, kernel = attention_lse.causal_attention_with_lse(q, k, v, 0.3)
    s = q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2) * 0.3
    ref = torch.logsumexp(s.masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf")), -1)
    assert kernel == "cpu_flash" and out.shape == q.shape
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)

    def refuse(*_):
        raise sdpa_split.SplitUnavailable("fp32")

    meta = torch.empty(1, 6, 20, 8, device="meta")
    monkeypatch.setattr(attention_lse, "sdpa_with_lse", lambda *_: ("out", "lse"))
    assert attention_lse.causal_attention_with_lse(meta, meta, meta, 0.3) == ("out", "lse", "cudnn")
    monkeypatch.setattr(attention_lse, "sdpa_with_lse", refuse)
    monkeypatch.setattr(attention_lse, "efficient_attention_with_lse", lambda *_: ("out", "lse"))
    assert attention_lse.causal_attention_with_lse(meta, meta, meta, 0.3) == ("out", "lse", "efficient")
    monkeypatch.setattr(attention_lse, "efficient_attention_with_lse", lambda *_: None)
    assert attention_lse.causal_attention_with_lse(meta, meta, meta, 0.3) is None


def test_bench_h2o_mass_says_which_attention_and_mass_ran(capsys):
    """``benchmarks/bench_h2o_mass.py`` on the CPU: its JSON names the attention kernel and the mass backend that ran
    (run O's fp32 call on CUDA failed where cuDNN refused fp32), and the one-pass mass equals the two-pass one."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_h2o_mass

    assert bench_h2o_mass.main(["--tokens", "64", "--heads", "4,2,16", "--repeat", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["attention_kernel"], row["mass_backend"], row["dtype"]) == ("cpu_flash", "torch", "float32")
    assert row["max_rel_diff"] < 1e-5


@needs_triton
def test_bench_h2o_mass_sweeps_the_tiles(capsys):
    """The tile sweep of ``benchmarks/bench_h2o_mass.py`` (Triton under the interpreter on the CPU): one JSON line
    per combination, ``auto`` the default, each one-pass mass equal to the two-pass one, also chunk by chunk."""
    import json
    import sys
    from pathlib import Path

    from sparse_hf.kernels.attention_mass import mass_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_h2o_mass

    assert bench_h2o_mass.main(["--backend", "triton", "--tokens", "40", "--heads", "4,2,16", "--repeat", "1",
                                "--mass-block-rows", "16,auto", "--mass-block-keys", "16", "--mass-stages", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["mass_config"] for r in rows] == [[16, 16, 4, 1], list(mass_config(16, (None, 16, None, 1)))]
    assert bench_h2o_mass.main(["--backend", "triton", "--tokens", "40", "--heads", "4,2,16", "--repeat", "1",
                                "--mass-block-rows", "16", "--mass-block-keys", "16", "--chunk", "16"]) == 0
    rows += [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["chunk"] for r in rows] == [0, 0, 16]
    for r in rows:
        assert r["mass_backend"] == "triton" and r["max_rel_diff"] < 1e-5 and r["mass_lse_over_attention"] > 0
        assert r["triton_tiles"]["pass2_over_causal"] >= 1.0


def no_lse(monkeypatch):
    """The previous behaviour: the HF path and the engine give the mass no log-sum-exp (it computes its own)."""
    monkeypatch.setattr(hf_cache, "attention_with_lse", lambda *a, **k: None)
    monkeypatch.setattr(ScoredPoolAttention, "_prefill_attention",
                        lambda self, *a, **k: (ScoredPoolAttention.__mro__[1]._prefill_attention(self, *a, **k)[0],
                                               None))


def spy_lse(monkeypatch, method_cls):
    """Record whether each prompt ``accumulate`` call got a log-sum-exp."""
    seen = []
    original = method_cls.accumulate

    def accumulate(self, *args, lse=None, **kwargs):
        seen.append(lse is not None)
        return original(self, *args, lse=lse, **kwargs)

    monkeypatch.setattr(method_cls, "accumulate", accumulate)
    return seen


def with_and_without_lse():
    """``(use_lse, seen)`` twice: the attention's log-sum-exp given to the mass, then withheld
    (:func:`no_lse`); ``seen`` records, per prompt ``accumulate`` call of H2O, whether it got one."""
    from sparse_hf.methods.h2o import H2O

    for use_lse in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not use_lse:
                no_lse(mp)
            yield use_lse, spy_lse(mp, H2O)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_hf_path_scores_with_the_attention_lse_equal_the_two_pass_scores(normalization, chunk):
    model = tiny_model("qwen2", layers=2)
    ids, mask = left_padded_batch((40, 27))
    knobs = dict(KNOBS, score_normalization=normalization)
    extra = dict(prefill_chunk_size=chunk) if chunk else {}
    runs = {}
    for use_lse, seen in with_and_without_lse():
        runs[use_lse] = greedy(model, ids, mask, new_tokens=6, cache_implementation="h2o", cache_config=knobs,
                               return_dict_in_generate=True, **extra)
        prompt_calls = 2 * (1 if chunk is None else -(-40 // chunk))                   # layers x chunks
        assert all(seen[:prompt_calls]) == use_lse and any(seen[:prompt_calls]) == use_lse
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].past_key_values.layers, runs[False].past_key_values.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)


ROUTES = [("gather", "torch"), ("paged", "torch"), pytest.param("paged", "triton", marks=needs_triton),
          ("split", "torch")]


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("route,backend", ROUTES)
def test_engine_scores_with_the_attention_lse_equal_the_two_pass_scores(route, backend, normalization,
                                                                        monkeypatch):
    """Chunked prompts of different lengths (chunks see earlier chunks), several per step; the split route with
    its SDPA ops replaced by an exact math stand-in (CUDA-only ops)."""
    monkeypatch.setattr(sdpa_split, "_call", math_sdpa)
    monkeypatch.setattr(sdpa_split, "_working", {})
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((30, 45, 9), seed=8)
    knobs = dict(KNOBS, score_normalization=normalization)
    runs = {}
    for use_lse, seen in with_and_without_lse():
        llm = LLM(model, num_kv_slots=512, max_model_len=96, chunk_prefill_size=16, max_num_batched_tokens=24,
                  sparse_method="h2o", **knobs)
        llm.runner.attention.prefill_route = route
        llm.runner.attention.backend = llm.runner.attention.mass_backend = backend
        tokens = engine_tokens(llm, prompts, 6)
        assert seen and all(seen) == use_lse and any(seen) == use_lse
        runs[use_lse] = tokens, llm.pool.scores.clone(), llm.pool.pos.clone()
    assert runs[True][0] == runs[False][0]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[True][2], runs[False][2])


def chunk_lse64(q, k, prefix):
    """``[B, H, n]`` float64 log-sum-exp of ``q [B, H, n, D]`` over ``k [B, Hkv, L, D]``, query ``i`` seeing keys
    ``0 .. prefix + i``."""
    G = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * 0.125
    n, L = q.shape[2], k.shape[2]
    seen = torch.arange(L, device=q.device).view(1, -1) <= torch.arange(n, device=q.device).view(-1, 1) + prefix
    return torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)


@pytest.mark.gpu
def test_every_lse_source_on_cuda_equals_float64():
    """The fused kernels the GPU runs: cuDNN's (the engine's split route, the HF path's unpadded prompt), the
    memory-efficient one (the fp32 gather route; the HF path's masked prompts) and the paged Triton kernel; bf16 and
    fp32, 9/3 heads of 64."""
    from sparse_hf.engine.attention import chunk_attention
    from sparse_hf.kernels.attention_lse import efficient_attention_with_lse

    g = torch.Generator().manual_seed(9)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        q = torch.randn(1, 9, 1024, 64, generator=g).cuda().to(dtype)
        k, v = (torch.randn(1, 3, 3072, 64, generator=g).cuda().to(dtype) for _ in range(2))
        want = chunk_lse64(q, k, 2048)
        fused = efficient_attention_with_lse(q, k, v, 0.125)
        assert fused is not None, "the memory-efficient kernel refused"
        torch.testing.assert_close(fused[1].double(), want, rtol=tol, atol=tol)
        out, lse = chunk_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), 0.125,
                                   return_lse=True)
        torch.testing.assert_close(out, chunk_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                                        v[0].transpose(0, 1), 0.125), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.T.double(), want[0], rtol=tol, atol=tol)
        tables = torch.arange(3072, device="cuda", dtype=torch.int32).view(1, -1)
        plse = torch.zeros(1024, 9, device="cuda")
        paged_prefill_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), tables,
                                [(0, 0, 1024, 3072)], 0.125, "triton", lse=plse)
        torch.testing.assert_close(plse.T.double(), want[0], rtol=tol, atol=tol)
        if dtype == torch.bfloat16:                                   # cuDNN: bf16 only
            _, slse = sdpa_split.split_chunk_attention(q[0].transpose(0, 1), k[0, :, :2048].transpose(0, 1),
                                                       v[0, :, :2048].transpose(0, 1), k[0, :, 2048:].transpose(0, 1),
                                                       v[0, :, 2048:].transpose(0, 1), 0.125, return_lse=True)
            torch.testing.assert_close(slse.T.double(), want[0], rtol=tol, atol=tol)
            qq, kk, vv = q[:, :, :1024], k[:, :, :1024], v[:, :, :1024]
            fused = attention_with_lse(*(t.expand(2, -1, -1, -1).contiguous() for t in (qq, kk, vv)), None, 0.125)
            assert fused is not None, "cuDNN refused the HF path's unpadded prompt"
            hlse = fused[1]
            torch.testing.assert_close(hlse.double(), chunk_lse64(qq, kk, 0).expand(2, -1, -1), rtol=tol, atol=tol)
        # the HF path's masked prompt on CUDA (left padding, a later chunk): the memory-efficient kernel with HF's
        # mask, its output SDPA's
        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal = 3, True
        mask = hf_masks(q=40, n=100, pad=(0, 30)).cuda()
        qq, kk, vv = q[:, :, :40].expand(2, -1, -1, -1), k[:, :, :100].expand(2, -1, -1, -1), \
            v[:, :, :100].expand(2, -1, -1, -1)
        fused = attention_with_lse(qq, kk, vv, mask, 0.125)
        assert fused is not None, "the memory-efficient kernel refused HF's mask"
        want_out, _ = sdpa_attention_forward(module, qq, kk, vv, mask, scaling=0.125)
        torch.testing.assert_close(fused[0], want_out, rtol=tol, atol=tol)
        s64 = qq.double() @ kk.double().repeat_interleave(3, 1).transpose(-1, -2) * 0.125
        ref = torch.logsumexp(s64.masked_fill(~mask, float("-inf")), -1)
        real = mask.any(-1).expand_as(ref)
        torch.testing.assert_close(fused[1].double()[real], ref[real], rtol=tol, atol=tol)


@pytest.mark.gpu
def test_engine_and_hf_h2o_on_cuda_with_the_lse_equal_two_passes():
    """Engine (its default routes on CUDA, fp32: the gather route through the memory-efficient kernel) and HF path,
    tiny random Llama: the same tokens with and without the attention's log-sum-exp (fp32: the masses differ by
    rounding only; bf16 near-ties of a random model could flip a kept token either way, so not compared here)."""
    model = tiny_model("llama", layers=2).to("cuda")
    prompts = random_prompts((300, 900, 77), seed=10)
    knobs = dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=32)
    runs = {}
    for use_lse, seen in with_and_without_lse():
        llm = LLM(model, num_kv_slots=4096, max_model_len=1000, chunk_prefill_size=512, sparse_method="h2o",
                  **knobs)
        tokens = engine_tokens(llm, prompts, 8)
        hf = [greedy(model, torch.tensor([p], device="cuda"), None, new_tokens=8, cache_implementation="h2o",
                     cache_config=knobs) for p in prompts]
        assert any(seen) == use_lse
        runs[use_lse] = tokens, [h.tolist() for h in hf]
    assert runs[True] == runs[False]
