"""DeltaKV in the engine: greedy output equals the HF path's deltakv at the same knobs (batched, mixed lengths,
chunked prefill, quantised latents, count and fraction budgets; Llama, Qwen2 and Qwen3, whose key norm makes the
compressed layers keep pre-norm keys), compressed raw slots really return to the pool, the pool and the compressed
store are empty after the requests, and bad set-ups fail clearly.

The engine compresses each row on its own (per-row states), as the HF path does per row, so each prompt is checked
against a one-row HF run; near-ties of a tiny random model are judged by the HF logits (``assert_greedy_equal``)."""

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, greedy_params, hf_greedy, hf_greedy_with_logits, \
    peak_decoding_rows, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM

KNOBS = dict(full_attn_layers=[0, 2], num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
             deltakv_neighbor_count=2)
ENGINE = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)


def compressor(model, latent=16):
    torch.manual_seed(0)
    return DeltaKVCompressor.for_model(model.config, kv_compressed_size=latent)


@pytest.mark.parametrize("arch,budget,bits", [("llama", 6, 0), ("qwen2", 0.25, 4), ("llama", 10, 8),
                                              ("qwen2", 1000, 0), ("qwen3", 6, 8), ("qwen3", 0.25, 0)])
def test_engine_equals_hf_path(arch, budget, bits):
    model = tiny_model(arch, layers=4)
    comp = compressor(model)
    knobs = dict(KNOBS, num_top_tokens=budget, kv_quant_bits=bits)
    prompts = random_prompts((20, 50, 77))
    llm = LLM(model, sparse_method="deltakv", compressor=comp, **ENGINE, **knobs)
    ours = engine_tokens(llm, prompts, 30)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 30, cache_implementation="deltakv",
                                                        cache_config=dict(knobs, compressor=comp)))
    vanilla = [hf_greedy(model, p, 30) for p in prompts]
    assert ours != vanilla, "knobs too loose: deltakv changed nothing, so the test would prove nothing"
    llm.pool.check_whole()


@pytest.mark.parametrize("filter_layers", [[0, 2, 4, 5], [0, 1, 3, 6]])
def test_engine_equals_hf_path_with_uneven_filter_layers(filter_layers):
    """Filter-layer sets of the shape ``sparse-hf calibrate`` chooses (consecutive filter layers, long gaps, the
    last layer full): the engine's compressed-layer groups still match the HF path's per-layer cache."""
    model = tiny_model("qwen2", layers=7)
    comp = compressor(model)
    knobs = dict(KNOBS, full_attn_layers=filter_layers, num_top_tokens=0.25)
    prompts = random_prompts((40, 77))
    llm = LLM(model, sparse_method="deltakv", compressor=comp, **ENGINE, **knobs)
    for prompt, got in zip(prompts, engine_tokens(llm, prompts, 20)):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 20, cache_implementation="deltakv",
                                                        cache_config=dict(knobs, compressor=comp)))
    llm.pool.check_whole()


def test_compressed_slots_return_to_the_pool():
    """After the prompt a row holds only sinks + buffer in the compressed layers' group; the rest is latents."""
    model = tiny_model("llama", layers=4)
    llm = LLM(model, num_kv_slots=400, max_model_len=128, max_num_seqs=4, sparse_method="deltakv",
              compressor=compressor(model), num_top_tokens=6, **KNOBS)
    pool = llm.pool
    # the memory of 400 full slots: the compressed layers' group holds one whole prompt plus 4 rows' sinks + buffers
    filt, comp = pool.group_slots
    assert comp == 128 + 4 * (2 + 2 * 4) < filt
    llm.add_request("a", random_prompts((90,), seed=3)[0], greedy_params(12))
    llm.step()                                                         # the whole prompt, then its flush
    row = llm.requests["a"].row
    # 90 tokens: 2 sinks, a buffer of 88 -> 84 compressed (multiples of 4 while 4..7 stay raw): 6 raw slots left
    assert int(pool.lens[0, row]) == 90 and int(pool.lens[1, row]) == 6 and pool.store.count(row) == 84
    assert pool.free_top == [filt - 90, comp - 6]
    assert pool.row_tokens(row) == 2 * 90 + 2 * 6 + 2 * 84
    assert pool.store.nbytes() > 0
    assert llm.stats()["kv_usage"] == pytest.approx((2 * 90 + 2 * 6) / (2 * filt + 2 * comp))
    seen = set()
    while llm.has_unfinished_requests():
        llm.step()
        if llm.requests:
            n = int(pool.lens[1, row])
            assert 2 + 4 <= n < 2 + 8, n                                # sinks + a buffer of recent..2*recent-1
            seen.add(pool.store.count(row))
    assert len(seen) > 1, "no flush happened during decode"
    pool.check_whole()


def test_the_same_memory_runs_more_requests_together():
    """The memory of ``num_kv_slots`` full slots holds more rows with deltakv: its compressed layers keep only
    sinks + buffers raw (plus small latents), so its filter layers get more slots than a vanilla pool has."""
    model = tiny_model("llama", layers=4)
    prompts = random_prompts((100,) * 12, seed=9)        # a vanilla pool of 1000 slots holds 9 of them at most

    def peak_running(**kw):
        llm = LLM(model, num_kv_slots=1000, max_model_len=128, max_num_seqs=12, chunk_prefill_size=64, **kw)
        peak = peak_decoding_rows(llm, prompts, 20)
        llm.check_pool_whole()
        return peak
    ours = peak_running(sparse_method="deltakv", compressor=compressor(model, latent=8), num_top_tokens=6,
                        **dict(KNOBS, full_attn_layers=[0]))
    vanilla = peak_running()
    assert vanilla <= 1000 // 101 < ours, (vanilla, ours)


def test_preemption_and_many_requests_leave_the_pool_whole():
    model = tiny_model("qwen2", layers=3)
    llm = LLM(model, num_kv_slots=160, max_model_len=128, chunk_prefill_size=32, max_num_seqs=4,
              sparse_method="deltakv", compressor=compressor(model), num_top_tokens=4,
              **dict(KNOBS, full_attn_layers=[0]))
    prompts = random_prompts((60, 45, 70, 30, 52), seed=5)
    outs = llm.generate(prompts, greedy_params(20))
    assert all(len(o.token_ids) == 20 for o in outs)
    assert any(o.metrics["num_preemptions"] for o in outs), "the pool was large enough: nothing was tested"
    llm.pool.check_whole()


def test_clear_errors():
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="needs a compressor"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", num_top_tokens=4)
    other = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="does not fit this model"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", compressor=compressor(other), num_top_tokens=4)
    torch.manual_seed(0)
    partial = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16, compressed_layers=[1])
    with pytest.raises(ValueError, match="no weights for layers"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", compressor=partial, num_top_tokens=4,
            full_attn_layers=[0])
    with pytest.raises(ValueError, match="cuda_graph"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", compressor=compressor(model), cuda_graph=True)


def test_qwen3_keeps_pre_norm_keys_counted_in_the_split():
    """Qwen3 is served (no refusal): its key norm cannot be undone, so the compressed layers' slots keep pre-norm
    keys beside K/V. The memory split counts them: the pool's raw tensors plus the compressed bytes its filter slots
    reserve fit the memory of ``num_kv_slots`` full slots, and a split that left them out would overrun it. A pool
    without them for such a model is refused."""
    from sparse_hf.engine.deltakv_attention import DeltaKVRunner
    from sparse_hf.engine.deltakv_store import DeltaKVPool, compressed_bytes_per_token, split_slots

    model = tiny_model("qwen3", layers=4)
    llm = LLM(model, num_kv_slots=600, max_model_len=128, max_num_seqs=4, sparse_method="deltakv",
              compressor=compressor(model), num_top_tokens=6, **KNOBS)
    pool, method, proj = llm.pool, llm.runner.method, llm.runner.projections
    assert sorted(pool.pre_norm_k) == method.sparse_layers() == [1, 3]
    for layer, side in pool.pre_norm_k.items():
        assert side.shape == pool.k[layer].shape and side.dtype == pool.k[layer].dtype
    budget = 600 * (2 * 4 * 2 * 16 * 4 + 4)              # 600 full slots: 4 layers, 2 KV heads of 16, fp32, an id
    per_latent = len(method.sparse_layers()) * compressed_bytes_per_token(method, proj, torch.float32)

    def held(p):      # bytes of every slot (the scratch slot aside, as in a vanilla pool), ids, reserved latents
        raw = sum(t[:-1].numel() * t.element_size() for layer in range(p.num_layers) for t in p.slot_tensors(layer))
        return raw + 4 * sum(p.group_slots) + p.group_slots[0] * per_latent

    split = split_slots(budget, method, proj, 2, 16, torch.float32, 128, 4, pre_norm_keys=True)
    assert pool.group_slots == split and split[1] == 128 + 4 * (2 + 2 * 4)
    assert held(pool) <= budget
    uncounted = split_slots(budget, method, proj, 2, 16, torch.float32, 128, 4)
    assert uncounted[0] > split[0]
    wrong = DeltaKVPool(4, 2, 16, uncounted, 4, 128, torch.float32, pool.device, method, pre_norm_keys=True)
    assert held(wrong) > budget
    outs = llm.generate(random_prompts((90, 40), seed=3), greedy_params(10))
    assert all(len(o.token_ids) == 10 for o in outs) and pool.store.version > 0
    llm.pool.check_whole()
    bare = DeltaKVPool(4, 2, 16, split, 4, 128, torch.float32, pool.device, method)
    with pytest.raises(ValueError, match="pre-norm keys"):
        DeltaKVRunner(llm.model, bare, method, proj)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_equals_tp1(arch):
    """Under tensor parallelism a flush all-gathers every rank's heads (the compressor reads all of concat(K, V);
    Qwen3: each rank's pre-norm keys), every rank keeps the same latents and rebuilds its own heads, and the
    observation scores are all-reduced (max) before the pick: TP=2 (gloo, two processes) gives TP=1's tokens, and
    both ranks' pools end whole."""
    model = tiny_model(arch, layers=4)
    comp = compressor(model)
    knobs = dict(KNOBS, num_top_tokens=6, compressor=comp)
    prompts = random_prompts((20, 50, 77))
    tp1 = engine_tokens(LLM(model, sparse_method="deltakv", **ENGINE, **knobs), prompts, 30)
    with LLM(model, tensor_parallel_size=2, sparse_method="deltakv", **ENGINE, **knobs) as llm:
        assert llm.pool.num_kv_heads == 1
        tp2 = engine_tokens(llm, prompts, 30)
        llm.check_pool_whole()
    for prompt, a, b in zip(prompts, tp2, tp1):
        if a != b:          # the all-reduce sums in another order: only a near-tie of the reference may part them
            ref, logits = hf_greedy_with_logits(model, prompt, 30, cache_implementation="deltakv",
                                                cache_config=knobs)
            assert_greedy_equal(a, ref, logits)
            assert_greedy_equal(b, ref, logits)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_the_triton_kernels_in_the_engine_give_the_torch_tokens(monkeypatch, arch):
    """The fused rebuild (writing in place into the step's strided K/V buffer; Qwen3: with its k_norm) and the
    decode kernels give the torch references' tokens: on CUDA when there is one, else under the Triton interpreter
    on CPU."""
    import os
    from functools import partial

    from sparse_hf.deltakv import state as core
    from sparse_hf.kernels import HAS_TRITON, deltakv_rebuild_kv

    cuda = torch.cuda.is_available()
    if not HAS_TRITON or not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton, and CUDA or TRITON_INTERPRET=1")
    model = tiny_model(arch, layers=4).to("cuda" if cuda else "cpu")
    knobs = dict(KNOBS, num_top_tokens=5, kv_quant_bits=4, compressor=compressor(model))
    prompts = random_prompts((30, 23), seed=4)

    def run():
        llm = LLM(model, sparse_method="deltakv", **ENGINE, **knobs)
        if core.deltakv_rebuild_kv is not deltakv_rebuild_kv:
            llm.runner.attention.backend = "triton"
        out = engine_tokens(llm, prompts, 8)
        llm.pool.check_whole()
        return out
    torch_tokens = run()
    monkeypatch.setattr(core, "deltakv_rebuild_kv", partial(deltakv_rebuild_kv, backend="triton"))
    assert run() == torch_tokens


def test_aborts_and_arrivals_leave_the_pool_and_store_empty():
    import random

    from engine_helpers import run_mixed_requests

    model = tiny_model("llama", layers=4)
    llm = LLM(model, num_kv_slots=120, max_model_len=40, max_num_seqs=6, chunk_prefill_size=4,
              max_num_batched_tokens=8, sparse_method="deltakv", compressor=compressor(model), num_top_tokens=3,
              **dict(KNOBS, num_sink_tokens=1, num_recent_tokens=2))
    finished, aborted = run_mixed_requests(llm, random.Random(1), 40, max_prompt=14, max_burst=5)
    assert len(finished) == 40 and aborted
    llm.pool.check_whole()


def seven_b_split_inputs(bits):
    from transformers import Qwen2Config

    from sparse_hf.engine.config import build_method

    config = Qwen2Config(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584)
    torch.manual_seed(0)
    with torch.device("meta"):
        comp = DeltaKVCompressor.for_model(config, kv_compressed_size=256).to(torch.bfloat16)
    method = build_method("deltakv", dict(compressor=comp, kv_quant_bits=bits, num_top_tokens=2048,
                                          num_sink_tokens=4, num_recent_tokens=64), 28)
    return method, comp.projections


@pytest.mark.parametrize("bits,at_least", [(0, 1.8), (4, 2.4)])
def test_the_split_for_the_7b_shape(bits, at_least):
    """The memory of a vanilla pool holds this many times more tokens in deltakv's filter layers (the bound on rows
    after their prompts) for Qwen2.5-7B's KV shape (28 layers, 4 KV heads of 128, bf16), the default filter layers,
    a latent-256 compressor and an H200's pool (1.9M vanilla slots, 109 GB), with room for one 131072-token prompt
    raw in the compressed layers: 1.84x with bf16 latents, 2.45x with int4 latents."""
    from sparse_hf.engine.deltakv_store import split_slots

    method, proj = seven_b_split_inputs(bits)
    vanilla = 1_900_000
    per_slot = 2 * 28 * 4 * 128 * 2 + 4
    filt, compressed = split_slots(vanilla * per_slot, method, proj, 4, 128, torch.bfloat16, 131072, 8)
    assert compressed == 131072 + 8 * (4 + 2 * 64)                        # a prompt + 8 rows of sinks + buffers
    assert filt >= at_least * vanilla, filt / vanilla


@pytest.mark.parametrize("arch,budget", [("llama", 5), ("llama", 0.25), ("qwen3", 5)])
def test_graph_decode_bookkeeping(monkeypatch, arch, budget):
    """The CUDA-graph decode's bookkeeping on CPU, with a stand-in graph that replays by running the captured step
    again: a capture at each change of rows, widths or store version (a flush), replays in between, the eager
    tokens, and nothing carried over from the warm-up (the layers' shared picks are recomputed in the forward;
    Qwen3's pre-norm keys are stored from the graph's static inputs)."""
    from sparse_hf.engine.deltakv_graphs import DeltaKVGraphs

    class StandIn(DeltaKVGraphs):
        def _capture(self, key):
            b, w = len(key[0]), key[-1]
            self._forward(b, w)                                # the warm-up
            self.graph, self.key = type("G", (), {"replay": staticmethod(lambda: self._forward(b, w))})(), key
            self.captures += 1

    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=budget, compressor=compressor(model))
    prompts = random_prompts((20, 50, 77))
    eager = engine_tokens(LLM(model, sparse_method="deltakv", **ENGINE, **knobs), prompts, 30)
    llm = LLM(model, sparse_method="deltakv", **ENGINE, **knobs)
    graphs = llm.runner.graphs = StandIn(llm.model, llm.pool, llm.runner.attention)
    replays = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda *a: replays.append(graphs._key(a[-1]) == graphs.key) or run(*a))
    assert engine_tokens(llm, prompts, 30) == eager
    assert 0 < graphs.captures < len(replays) and sum(replays) == len(replays) - graphs.captures
    llm.pool.check_whole()


@pytest.mark.parametrize("bits", [0, 4])
def test_longest_prompt_is_the_largest_split_that_fits(bits):
    """``longest_prompt``: the split at that length has room for it in both groups, one more token does not fit;
    and it stays below a vanilla pool's (a prompt is held raw in every layer until it ends, and its filter slots
    also reserve its compressed bytes)."""
    from sparse_hf.engine.deltakv_store import longest_prompt, split_slots

    method, proj = seven_b_split_inputs(bits)
    per_vanilla_slot = 2 * 28 * 4 * 128 * 2 + 4
    budget = 1_900_000 * per_vanilla_slot                           # an H200's pool
    longest = longest_prompt(budget, method, proj, 4, 128, torch.bfloat16)
    filt, need = split_slots(budget, method, proj, 4, 128, torch.bfloat16, longest, 1)
    assert min(filt, need) >= longest
    filt, need = split_slots(budget, method, proj, 4, 128, torch.bfloat16, longest + 1, 1)
    assert min(filt, need) < longest + 1
    assert 0.5 * 1_900_000 < longest < 1_900_000


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_graph_decode_gives_the_eager_and_hf_tokens(arch):
    """On the GPU (fp32, Triton kernels): the captured decode (Qwen3: the pre-norm keys stored from the graph's static
    inputs, the fused rebuild with k_norm) gives the eager engine's tokens, and both the HF path's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(arch, layers=4).to("cuda")
    comp = compressor(model)
    knobs = dict(KNOBS, num_top_tokens=6, kv_quant_bits=4)
    prompts = random_prompts((20, 50, 77))
    eager = engine_tokens(LLM(model, sparse_method="deltakv", enforce_eager=True, compressor=comp, **ENGINE, **knobs),
                          prompts, 30)
    llm = LLM(model, sparse_method="deltakv", compressor=comp, **ENGINE, **knobs)
    assert engine_tokens(llm, prompts, 30) == eager
    assert llm.runner.graphs.captures > 0 and not llm.runner.graphs.failed
    llm.pool.check_whole()
    for prompt, got in zip(prompts, eager):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 30, cache_implementation="deltakv",
                                                        cache_config=dict(knobs, compressor=comp)))
