"""H2O in the engine: accumulated attention beside the pool, eviction at every decode step.

The engine equals the HF path's h2o at the same knobs (greedy, CPU fp32, mixed-length batches, chunked prefill),
each row holds at most its budget once decoding, the pool is whole after mixed requests with aborts and
preemption, and the batched compaction (``ScoredKVPool.keep_rows``) equals ``KVPool.keep`` row by row."""

import random
from types import SimpleNamespace

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import (assert_greedy_equal, engine_tokens, greedy_params, hf_greedy, hf_greedy_with_logits,
                            random_prompts, run_mixed_requests)
from helpers import spy_device_reads, tiny_model
from sparse_hf.engine import LLM
from sparse_hf.engine.graphs import DecodeGraphs
from sparse_hf.engine.kv_pool import KVPool
from sparse_hf.engine.scored_pool import ScoredKVPool
from test_attention_mass import needs_triton

COUNT = dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8)
FRACTION = dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=0.25)      # a budget per row
LENGTHS = (20, 50, 77, 9)
NEW_TOKENS = 40


@pytest.mark.parametrize("arch,knobs,chunk", [("llama", COUNT, 16), ("qwen2", FRACTION, 16), ("qwen3", COUNT, 256),
                                              ("llama", FRACTION, 7),
                                              ("qwen2", dict(FRACTION, score_normalization="mean"), 16)])
def test_engine_h2o_equals_hf_path(arch, knobs, chunk):
    model = tiny_model(arch, layers=3)
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(model, num_kv_slots=1024, max_model_len=256, chunk_prefill_size=chunk, sparse_method="h2o", **knobs)
    ours = engine_tokens(llm, prompts, NEW_TOKENS)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, NEW_TOKENS, cache_implementation="h2o",
                                                        cache_config=knobs))
    assert ours != [hf_greedy(model, p, NEW_TOKENS) for p in prompts], "knobs too loose: h2o changed nothing"
    llm.pool.check_whole()


def test_rows_hold_their_budget_while_decoding():
    """Once its prompt is evicted a row never holds more than its budget in any layer (the new token of a step is
    evicted in the same step), and short prompts grow up to it."""
    model = tiny_model("qwen2", layers=2)
    llm = LLM(model, num_kv_slots=512, max_model_len=160, chunk_prefill_size=32, sparse_method="h2o", **FRACTION)
    for i, prompt in enumerate(random_prompts((90, 30, 5), seed=4)):
        llm.add_request(str(i), prompt, greedy_params(30))
    seen_full = set()
    while llm.has_unfinished_requests():
        llm.step()
        for req in llm.scheduler.running:
            if req.in_prefill:
                continue
            budget = llm.runner.row_budget[req.row]
            held = llm.pool.lens[:, req.row]
            assert held.max() <= budget and held.min() == held.max()
            if held.max() == budget:
                seen_full.add(req.request_id)
    assert seen_full == {"0", "1", "2"}
    llm.pool.check_whole()


def test_pool_whole_after_mixed_requests_with_aborts_and_preemption():
    model = tiny_model("llama", layers=2)
    llm = LLM(model, num_kv_slots=24, max_model_len=24, max_num_seqs=6, chunk_prefill_size=4,
              max_num_batched_tokens=8, sparse_method="h2o", num_sink_tokens=1, num_recent_tokens=2, num_top_tokens=2)
    finished, aborted = run_mixed_requests(llm, random.Random(1), 60, max_prompt=14, max_burst=5)
    assert len(finished) == 60 and aborted
    assert any(o.metrics["num_preemptions"] for o in finished.values()), "no preemption: pool too large for the test"
    llm.pool.check_whole()


def test_keep_rows_equals_keep_row_by_row():
    """The batched compaction (one gather and scatter for all rows) against :meth:`KVPool.keep` per row, on rows of
    different lengths that keep different counts; the scores move with their tokens."""
    torch.manual_seed(0)
    args = dict(num_layers=2, num_kv_heads=3, head_dim=4, num_slots=64, max_rows=4, max_len=32,
                per_layer_groups=True, dtype=torch.float32, device=torch.device("cpu"))
    ours, ref = ScoredKVPool(**args), KVPool(**args)
    lengths = [12, 5, 20]
    for pool in (ours, ref):
        pool.allocate([0, 1, 3], lengths)
    for layer in range(2):
        for a, b in ((ours.k[layer], ref.k[layer]), (ours.v[layer], ref.v[layer])):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
        ours.scores[layer].copy_(ours.k[layer][:, :, 0])        # a score that follows the token's K
    rows, counts = [0, 3, 1], [7, 9, 5]
    idx = torch.zeros(3, 3, 9, dtype=torch.long)
    for i, (row, count) in enumerate(zip(rows, counts)):
        n = lengths[[0, 1, 3].index(row)]
        for h in range(3):
            idx[i, h, :count] = torch.randperm(n)[:count].sort().values
    group = 1
    ours.keep_rows(group, rows, idx, counts)
    for i, (row, count) in enumerate(zip(rows, counts)):
        ref.keep(group, row, idx[i, :, :count])
    assert (ours.lens == ref.lens).all() and ours.free_top == ref.free_top
    assert sorted(ours.free[group, :ours.free_top[group]].tolist()) == sorted(
        ref.free[group, :ref.free_top[group]].tolist())
    for row, count in zip(rows, counts):
        slots = ours.tables[group, row, :count].long()
        assert torch.equal(ours.k[group][slots], ref.k[group][slots])
        assert torch.equal(ours.v[group][slots], ref.v[group][slots])
        assert torch.equal(ours.scores[group][slots], ours.k[group][slots][:, :, 0])
    other = 0                                                  # layer 0 is another group: untouched
    assert torch.equal(ours.k[other], ref.k[other])


class WarmUpThenReplay(DecodeGraphs):
    """CUDA-graph decode on CPU as :func:`~sparse_hf.engine.graphs.capture_step` runs it: at a capture the step runs
    once as the warm-up (``attention.warm_up`` set), the capture itself runs nothing, and every replay (the first
    one right after the capture) runs the step as captured."""

    def _capture(self, b: int, w: int) -> None:
        self._capture_forward(b, w)()                                   # the warm-up
        self.graphs[(b, w)] = SimpleNamespace(replay=lambda: self._forward(b, w))


def _live_scores(llm):
    """Each running row's scores, per layer, keyed by (row, layer, KV head, position): slots differ between runs."""
    pool, out = llm.pool, {}
    for req in llm.scheduler.running:
        if req.in_prefill:
            continue
        for layer in range(pool.num_layers):
            slots = pool.tables[pool.group_of[layer], req.row, :int(pool.lens[pool.group_of[layer], req.row])].long()
            for h in range(pool.num_kv_heads):
                for sl in slots.tolist():
                    out[(req.request_id, layer, h, int(pool.pos[layer, sl, h]))] = float(pool.scores[layer, sl, h])
    return out


@pytest.mark.parametrize("knobs", [COUNT, FRACTION])
def test_graph_decode_path_equals_eager(knobs):
    """The decode step through the CUDA-graph path (padded batch buckets, width buckets, warm-up before a capture)
    keeps the same tokens, per-position scores and slot counts as eager decode, step by step, on rows of different
    lengths and budgets. Regression guard: a warm-up that added its step's attention mass would count that step twice
    in the scores."""
    model = tiny_model("qwen2", layers=3)
    prompts = random_prompts((41, 17, 66), seed=2)          # batch 3 runs the bucket-4 path with one padding row
    kw = dict(num_kv_slots=1024, max_model_len=512, max_num_seqs=6, chunk_prefill_size=32, sparse_method="h2o",
              **knobs)
    runs = [LLM(model, **kw), LLM(model, **kw)]
    runs[1].runner.graphs = graphs = WarmUpThenReplay(runs[1].model, runs[1].pool, 6, runs[1].runner.attention)
    for llm in runs:
        for i, prompt in enumerate(prompts):
            llm.add_request(str(i), prompt, greedy_params(30))
    steps = 0
    while runs[0].has_unfinished_requests():
        outs = [llm.step() for llm in runs]
        assert [(o.request_id, list(o.token_ids)) for o in outs[0]] == \
               [(o.request_id, list(o.token_ids)) for o in outs[1]]
        assert (runs[0].pool.lens == runs[1].pool.lens).all()
        a, b = _live_scores(runs[0]), _live_scores(runs[1])
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        steps += 1
    assert not runs[1].has_unfinished_requests() and steps > 30
    assert {bb for bb, _ in graphs.graphs} >= {4}
    for llm in runs:
        llm.pool.check_whole()


@pytest.mark.parametrize("method,knobs", [("h2o", FRACTION), ("pyramidkv", dict(
    num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=6, window_size=4))])
def test_triton_decode_kernels_equal_hf_path(method, knobs):
    """The GPU's decode path on the CPU: the Triton kernels (interpreted) read the pool with per-row lengths that
    are a strided view (``lens[g]`` of the ``[G, B]`` table). Regression: with mixed lengths, rows ``b >= 1`` read
    other layers' lengths and the output left the HF path's at the second token (found on the H200)."""
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((20, 50, 9), seed=3)
    llm = LLM(model, num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16, sparse_method=method, **knobs)
    llm.runner.attention.backend = "triton"
    ours = engine_tokens(llm, prompts, 12)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 12, cache_implementation=method,
                                                        cache_config=knobs))
    llm.pool.check_whole()


@needs_triton
def test_h2o_triton_prefill_and_decode_give_the_torch_tokens():
    """The engine's H2O through the Triton kernels (the prefill's ``attention_mass`` reading the pool in place
    through the slot table, chunks that attend to earlier chunks; the decode scores) gives the torch backend's
    tokens: on CUDA when there is one, else under the Triton interpreter on CPU."""
    model = tiny_model("qwen2", layers=3).to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = random_prompts((41, 23, 70), seed=6)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, num_kv_slots=1024, max_model_len=128, chunk_prefill_size=16, sparse_method="h2o",
                  **FRACTION)
        llm.runner.attention.backend = backend
        tokens[backend] = engine_tokens(llm, prompts, 10)
        llm.pool.check_whole()
    assert tokens["triton"] == tokens["torch"]


def test_add_scores_adds_to_live_slots_and_ignores_the_scratch_slot():
    """The gather-add-scatter of :meth:`ScoredKVPool.add_scores` (many entries at the scratch slot, as the decode
    step sends for table positions past a row's length) adds each live slot's mass once."""
    pool = ScoredKVPool(num_layers=1, num_kv_heads=2, head_dim=4, num_slots=16, max_rows=2, max_len=8,
                        per_layer_groups=False, dtype=torch.float32, device=torch.device("cpu"))
    pool.scores[0].copy_(torch.arange(34, dtype=torch.float32).view(17, 2))
    before = pool.scores[0].clone()
    slots = torch.tensor([3, pool.scratch_slot, 7, pool.scratch_slot, 0, pool.scratch_slot])
    mass = torch.arange(12, dtype=torch.float32).view(6, 2) + 100
    pool.add_scores(0, slots, mass)
    want = before.clone()
    for i in (0, 2, 4):
        want[slots[i]] += mass[i]
    live = torch.arange(17) != pool.scratch_slot
    assert torch.equal(pool.scores[0][live], want[live])


@pytest.mark.gpu
def test_h2o_on_gpu_equals_hf_path():
    """CUDA, fp32: the decode scores come from the Triton ``decode_attention_with_scores`` over gathered slots; decode
    replayed from CUDA graphs (the default) gives the eager tokens (``enforce_eager=True``) and the HF path's."""
    model = tiny_model("llama", layers=3).to("cuda", torch.float32)
    prompts = random_prompts(LENGTHS, seed=3)
    runs = {}
    for eager in (True, False):
        llm = LLM(model, max_model_len=256, num_kv_slots=1024, chunk_prefill_size=16, sparse_method="h2o",
                  enforce_eager=eager, **FRACTION)
        assert (llm.runner.graphs is None) == eager
        runs[eager] = engine_tokens(llm, prompts, NEW_TOKENS)
        if not eager:
            assert llm.runner.graphs.graphs, "no decode step replayed a CUDA graph"
        llm.pool.check_whole()
    assert runs[False] == runs[True]
    for prompt, got in zip(prompts, runs[False]):
        ref, logits = hf_greedy_with_logits(model, prompt, NEW_TOKENS, cache_implementation="h2o",
                                            cache_config=FRACTION)
        assert_greedy_equal(got, ref, logits.cpu(), rel_tol=1e-3)


def test_decode_eviction_reads_nothing_back_from_the_device(monkeypatch):
    """The decode eviction (every step here: the prompts exceed their budgets) makes no call that waits for the
    device on CUDA (``item``, ``bool``, ``tolist``, ``cpu``, ``numpy``): what it needs to know on the host, which rows
    are over budget and how many slots go back, are host counts."""
    model = tiny_model("llama", layers=2)
    llm = LLM(model, num_kv_slots=512, max_model_len=128, max_num_seqs=4, sparse_method="h2o", **COUNT)
    for i, prompt in enumerate(random_prompts((30, 45, 26), seed=8)):
        llm.add_request(str(i), prompt, greedy_params(12))
    while any(r.in_prefill for r in llm.requests.values()) or not llm.scheduler.running:
        llm.step()
    calls = spy_device_reads(monkeypatch, llm.runner, "_evict_decode")
    before = llm.pool.free_top[:]
    for _ in range(5):
        llm.step()
    monkeypatch.undo()
    assert calls == []
    assert llm.pool.free_top == before and (llm.pool.lens[:, :3] == COUNT["num_sink_tokens"] + COUNT[
        "num_recent_tokens"] + COUNT["num_top_tokens"]).all()                 # every row evicted at every step
