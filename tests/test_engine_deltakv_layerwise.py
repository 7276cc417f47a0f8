"""DeltaKV's layer-wise prefill in the engine (``deltakv_prefill``): a prompt run layer by layer over a dense staging
K/V, each compressed layer flushed as soon as it is done, gives the chunked prefill's and the HF path's greedy
tokens (Llama, Qwen2, Qwen3; count and fraction budgets; quantised latents; prompts shorter than sinks + 2 * recent,
prompts spanning many chunks; flushes in one call or several blocks) and leaves the chunked prefill's raw slots and
compressed state, while other requests decode before and after it; the pool and the store end whole
after aborts and a failure mid-step; preemption still works; a prompt only the layer-wise path can hold is served
under ``auto`` and refused clearly under ``chunked``; the memory accounting (``longest_prompt``) matches what an
engine built with that budget admits; TP=2 gives TP=1's tokens."""

import warnings

import pytest
import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, greedy_params, hf_greedy_with_logits, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM
from sparse_hf.engine import deltakv_store

KNOBS = dict(full_attn_layers=[0, 2], num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
             deltakv_neighbor_count=2)
ENGINE = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)
#: 7 < sinks + 2 * recent (no flush at the prompt's end); 130 spans 9 chunks of 16 and compresses 124 tokens.
LENGTHS = (7, 20, 50, 77, 130)


def compressor(model, latent=16):
    torch.manual_seed(0)
    return DeltaKVCompressor.for_model(model.config, kv_compressed_size=latent)


def record_kinds(llm) -> list:
    """Wrap the scheduler so each step's kind is appended to the returned list."""
    kinds, schedule = [], llm.scheduler.schedule

    def recorded():
        kind, batch = schedule()
        kinds.append(kind)
        return kind, batch
    llm.scheduler.schedule = recorded
    return kinds


def check_against_hf(model, prompts, outs, knobs, new_tokens):
    for prompt, got in zip(prompts, outs):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, new_tokens, cache_implementation="deltakv",
                                                        cache_config=knobs))


@pytest.mark.parametrize("arch,budget,bits,block", [("llama", 6, 0, 65536), ("qwen2", 0.25, 4, 65536),
                                                    ("qwen3", 6, 8, 65536), ("qwen3", 0.25, 0, 65536),
                                                    ("llama", 0.25, 4, 11), ("qwen3", 6, 0, 9)])
def test_layerwise_equals_chunked_and_hf(monkeypatch, arch, budget, bits, block):
    """Every prompt runs layer-wise, one step each, with decode steps of the other rows between them (continuous
    batching); the tokens are the chunked engine's and the HF path's. ``block``: a compressed layer's prompt is
    flushed in blocks of that many tokens (11 and 9: several flushes per layer, block edges off the center grid)."""
    from sparse_hf.engine import deltakv_attention

    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=budget, kv_quant_bits=bits, compressor=compressor(model))
    prompts = random_prompts(LENGTHS, seed=2)
    chunked = engine_tokens(LLM(model, sparse_method="deltakv", deltakv_prefill="chunked", **ENGINE, **knobs),
                            prompts, 30)                       # every flush in one call
    monkeypatch.setattr(deltakv_attention, "FLUSH_BLOCK", block)
    llm = LLM(model, sparse_method="deltakv", deltakv_prefill="layerwise", **ENGINE, **knobs)
    kinds = record_kinds(llm)
    ours = engine_tokens(llm, prompts, 30)
    llm.pool.check_whole()
    assert kinds.count("layerwise") == len(prompts) and "prefill" not in kinds and "mixed" not in kinds
    first, last = kinds.index("layerwise"), len(kinds) - 1 - kinds[::-1].index("layerwise")
    assert "decode" in kinds[first:last], "no row decoded between two layer-wise prompts"
    if ours != chunked:          # other packing, other float sums: only near-ties of the reference may part them
        check_against_hf(model, prompts, chunked, knobs, 30)
    check_against_hf(model, prompts, ours, knobs, 30)


def prefilled(llm, prompt):
    """Run ``prompt``'s prefill (and its first token) alone in ``llm``; its row."""
    llm.add_request("p", prompt, greedy_params(4))
    while not llm.requests["p"].output_token_ids:
        llm.step()
    return llm.requests["p"].row


@pytest.mark.parametrize("arch,block", [("llama", 65536), ("llama", 9), ("qwen3", 65536), ("qwen3", 11)])
def test_layerwise_leaves_the_chunked_prefills_pool_and_store(monkeypatch, arch, block):
    """After one prompt's prefill the row's raw slots (filter layers: every token; compressed layers: sinks +
    buffer, Qwen3 with pre-norm keys) and every compressed layer's latents, fathers, centers and positions equal the
    chunked prefill's (flushed in one call, or in blocks of ``block`` tokens)."""
    from sparse_hf.engine import deltakv_attention

    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=6, kv_quant_bits=4, compressor=compressor(model))
    prompt = random_prompts((130,), seed=7)[0]
    pools = []
    for mode in ("chunked", "layerwise"):
        if mode == "layerwise":       # the chunked reference flushed in one call
            monkeypatch.setattr(deltakv_attention, "FLUSH_BLOCK", block)
        llm = LLM(model, sparse_method="deltakv", deltakv_prefill=mode, **ENGINE, **knobs)
        pools.append((llm.pool, prefilled(llm, prompt)))
    (ref, r0), (got, r1) = pools
    assert_same_row(ref, r0, got, r1, compressed=124)
    assert len(pools[0][0].pre_norm_k) == (2 if arch == "qwen3" else 0)


def assert_same_row(ref, r0, got, r1, compressed: int) -> None:
    """Row ``r1`` of pool ``got`` holds what row ``r0`` of ``ref`` holds: raw slots of every layer (with pre-norm
    keys), and every compressed layer's counts, positions, fathers, centers and latents."""
    assert (ref.lens[:, r0] == got.lens[:, r1]).all() and ref.store.count(r0) == got.store.count(r1) == compressed
    for layer in range(4):
        g = ref.group_of[layer]
        n = int(ref.lens[g, r0])
        a, b = ref.tables[g, r0, :n].long(), got.tables[g, r1, :n].long()
        for x, y in zip(ref.slot_tensors(layer), got.slot_tensors(layer)):
            torch.testing.assert_close(y[b], x[a], rtol=1e-5, atol=1e-5)
        if g == 0:
            continue
        s, t = ref.store.state(r0, layer), got.store.state(r1, layer)
        assert s.counts == t.counts
        for name in ("comp_pos", "center_pos"):
            assert torch.equal(getattr(s, name), getattr(t, name)), name
        assert torch.equal(s.fathers.long(), t.fathers.long())
        torch.testing.assert_close(t.center_x, s.center_x, rtol=1e-5, atol=1e-5)
        for x, y in zip(s.latent, t.latent):
            if x is not None:
                torch.testing.assert_close(y.float(), x.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_flush_in_blocks_equals_one_call(monkeypatch, arch):
    """The chunked prefill's prompt-end flush, in blocks of 9 tokens (several calls per layer, off the center
    grid), leaves the row and the store as one call does; so do the decode-time flushes after it."""
    from sparse_hf.engine import deltakv_attention

    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=6, kv_quant_bits=4, compressor=compressor(model))
    prompt = random_prompts((130,), seed=7)[0]
    pools, tokens = [], []
    for block in (65536, 9):
        monkeypatch.setattr(deltakv_attention, "FLUSH_BLOCK", block)
        llm = LLM(model, sparse_method="deltakv", deltakv_prefill="chunked", **ENGINE, **knobs)
        pools.append((llm.pool, prefilled(llm, prompt)))
        tokens.append(engine_tokens(LLM(model, sparse_method="deltakv", deltakv_prefill="chunked", **ENGINE, **knobs),
                                    [prompt], 40))
    (ref, r0), (got, r1) = pools
    assert_same_row(ref, r0, got, r1, compressed=124)
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_auto_runs_long_prompts_layerwise_beside_decoding_rows(monkeypatch, arch):
    """``auto`` with room for 40 raw prompt tokens: short prompts prefill chunked (mixed with decode rows), long ones
    layer-wise while the short ones are mid-decode; every request gives its one-row HF tokens."""
    monkeypatch.setattr(deltakv_store, "AUTO_CHUNKED_TOKENS", 40)
    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=5, compressor=compressor(model))
    llm = LLM(model, sparse_method="deltakv", max_num_seqs=8, **ENGINE, **knobs)
    assert llm.pool.group_slots[1] == 40 + 8 * (2 + 2 * 4)
    kinds = record_kinds(llm)
    prompts = dict(zip("abcd", random_prompts((12, 130, 25, 77), seed=6)))
    llm.add_request("a", prompts["a"], greedy_params(24))
    outs = {}
    for step in range(40):
        if step == 3:
            llm.add_request("b", prompts["b"], greedy_params(16))
            llm.add_request("c", prompts["c"], greedy_params(16))
        if step == 6:
            llm.add_request("d", prompts["d"], greedy_params(16))
        for out in llm.step():
            outs[out.request_id] = out
    while llm.has_unfinished_requests():
        for out in llm.step():
            outs[out.request_id] = out
    assert kinds.count("layerwise") == 2 and ("prefill" in kinds or "mixed" in kinds), kinds
    b_step = kinds.index("layerwise")
    # "a" decodes right before and after (after: beside "c"'s chunks in a mixed step)
    assert kinds[b_step - 1] == "decode" and kinds[b_step + 1] in ("decode", "mixed"), kinds
    llm.pool.check_whole()
    for rid, prompt in prompts.items():
        assert outs[rid].finished
        check_against_hf(model, [prompt], [outs[rid].token_ids], knobs, len(outs[rid].token_ids))


def test_aborts_and_a_failure_mid_step_leave_the_pool_and_store_whole(monkeypatch):
    model = tiny_model("llama", layers=4)
    knobs = dict(KNOBS, num_top_tokens=6, compressor=compressor(model))
    llm = LLM(model, sparse_method="deltakv", deltakv_prefill="layerwise", **ENGINE, **knobs)
    a, b, c = random_prompts((77, 50, 130), seed=4)
    llm.add_request("a", a, greedy_params(10))
    llm.add_request("b", b, greedy_params(10))
    llm.add_request("c", c, greedy_params(10))
    llm.step()                                       # "a" prefilled layer-wise; "b" and "c" wait
    assert llm.pool.store.count(llm.requests["a"].row) > 0
    llm.abort("a")                                   # after its layer-wise prefill
    llm.abort("c")                                   # still waiting for its turn
    outs = {}
    while llm.has_unfinished_requests():
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    assert outs["a"].finish_reason == outs["c"].finish_reason == "abort" and len(outs["b"].token_ids) == 10
    llm.pool.check_whole()

    runner = llm.runner
    calls, compress = [], runner.compress_layer

    def failing(*args, **kwargs):                    # the second compressed layer fails mid-step
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return compress(*args, **kwargs)
    monkeypatch.setattr(runner, "compress_layer", failing)
    llm.add_request("d", c, greedy_params(5))
    with pytest.raises(RuntimeError, match="injected"):
        llm.step()
    assert llm.pool.store.count(llm.requests["d"].row) > 0                # one layer was compressed already
    llm.abort("d")
    llm.step()
    llm.pool.check_whole()
    monkeypatch.setattr(runner, "compress_layer", compress)
    assert llm.runner.model.layers[0].self_attn.backend is runner.attention          # the backend was restored
    got = engine_tokens(llm, [c], 10)
    check_against_hf(model, [c], got, knobs, 10)
    llm.pool.check_whole()


@pytest.mark.parametrize("mode,slots", [("layerwise", 200), ("chunked", 160)])
def test_preemption(mode, slots):
    """Preemption prefills a request's prompt again (layer-wise: in one step) and replays its generated tokens as
    decode steps, so every request, preempted or not, gives the HF path's tokens.
    Regression (chunked, before the replay): a recompute whose last chunk ended one token before its end went on to
    decode without its prompt's flush ("a flush was skipped")."""
    model = tiny_model("qwen2", layers=3)
    knobs = dict(KNOBS, full_attn_layers=[0], num_top_tokens=4, compressor=compressor(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                    # max_model_len capped
        llm = LLM(model, num_kv_slots=slots, max_model_len=128, chunk_prefill_size=32, max_num_seqs=4,
                  sparse_method="deltakv", deltakv_prefill=mode, **knobs)
    prompts = random_prompts((60, 45, 70, 30, 52), seed=5)
    kinds = record_kinds(llm)
    outs = llm.generate(prompts, greedy_params(24))
    assert all(len(o.token_ids) == 24 for o in outs)
    assert any(o.metrics["num_preemptions"] for o in outs), "the pool was large enough: nothing was tested"
    if mode == "layerwise":                                     # the preempted ones were recomputed layer-wise
        assert kinds.count("layerwise") == len(prompts) + sum(o.metrics["num_preemptions"] for o in outs)
    llm.pool.check_whole()
    check_against_hf(model, prompts, [o.token_ids for o in outs], knobs, 24)


def compact_setup():
    """8 layers, one filter layer, a latent of 4 and a center every 8 tokens: a tiny model whose compressed tokens
    are small beside its raw ones (as a 7B model's are), so layer-wise prefill holds far longer prompts."""
    model = tiny_model("llama", layers=8)
    knobs = dict(KNOBS, full_attn_layers=[0], cluster_ratio=0.125, num_top_tokens=6,
                 compressor=compressor(model, latent=4))
    return model, knobs


def test_a_prompt_only_layerwise_can_hold(monkeypatch):
    """The memory of 100 full slots: chunked prefill must hold a prompt raw in every layer (one size for both groups,
    82), layer-wise only in the filter layer plus one layer's staging (159 with the hidden states in host memory)."""
    monkeypatch.setattr(deltakv_store, "AUTO_CHUNKED_TOKENS", 8)
    model, knobs = compact_setup()
    engine = dict(num_kv_slots=100, max_model_len=250, chunk_prefill_size=16, max_num_seqs=1,
                  layerwise_hidden_on_host=True)
    prompt = random_prompts((150,), seed=8)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                    # max_model_len capped
        chunked = LLM(model, sparse_method="deltakv", deltakv_prefill="chunked", **engine, **knobs)
    assert chunked.pool.num_slots < 151
    with pytest.raises(ValueError, match="can never fit the KV pool.*deltakv_prefill='chunked'.*'auto'"):
        chunked.add_request("x", prompt, greedy_params(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = LLM(model, sparse_method="deltakv", **engine, **knobs)
    assert auto.pool.group_slots[0] >= 151 and auto.pool.group_slots[1] == 8 + 1 * 10
    kinds = record_kinds(auto)
    got = engine_tokens(auto, [prompt], 8)
    assert kinds[0] == "layerwise"
    check_against_hf(model, [prompt], got, knobs, 8)
    auto.pool.check_whole()
    too_long = random_prompts((auto.pool.group_slots[0],), seed=8)[0]
    with pytest.raises(ValueError, match="layer-wise prefill needs .* filter layers"):
        auto.add_request("y", too_long, greedy_params(8))


def engine_budget(llm) -> tuple:
    """``(budget bytes, method, projections)`` as the engine's worker computes them from ``num_kv_slots``."""
    pool = llm.pool
    per_slot = 2 * pool.num_layers * pool.num_kv_heads * pool.head_dim * pool.k[0].element_size() + 4
    return llm.config.num_kv_slots * per_slot, llm.runner.method, llm.runner.projections


@pytest.mark.parametrize("host", [False, True])
def test_longest_prompt_is_what_an_engine_of_that_budget_admits(host):
    """``longest_prompt`` at batch 1: layer-wise > chunked; an engine built with that budget and
    ``max_model_len`` = that length keeps it (a prompt one shorter is served), a longer ``max_model_len`` is capped
    below the request, and a prompt much longer is refused; the chunked engine refuses the layer-wise length."""
    from sparse_hf.engine.deltakv_store import layerwise_bytes_per_token, longest_prompt

    model, knobs = compact_setup()
    engine = dict(num_kv_slots=120, max_num_seqs=1, chunk_prefill_size=64, sparse_method="deltakv",
                  layerwise_hidden_on_host=host)
    probe = LLM(model, max_model_len=64, **engine, **knobs)
    budget, method, proj = engine_budget(probe)
    args = (budget, method, proj, 2, 16, torch.float32)
    chunked = longest_prompt(*args)
    layerwise = longest_prompt(*args, layerwise_per_token=layerwise_bytes_per_token(2, 16, torch.float32, False, 64,
                                                                                    torch.float32, host))
    assert chunked < 120 < layerwise, (chunked, layerwise)
    llm = LLM(model, max_model_len=layerwise, deltakv_prefill="layerwise", **engine, **knobs)
    assert llm.max_model_len == layerwise
    prompt = random_prompts((layerwise - 1,), seed=1)[0]
    assert len(engine_tokens(llm, [prompt], 1)[0]) == 1
    llm.pool.check_whole()
    with pytest.warns(UserWarning, match="capped"):
        longer = LLM(model, max_model_len=layerwise + 40, deltakv_prefill="layerwise", **engine, **knobs)
    assert longer.max_model_len < layerwise + 40
    with pytest.raises(ValueError):
        longer.add_request("x", random_prompts((layerwise + 30,), seed=1)[0], greedy_params(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = LLM(model, max_model_len=layerwise, deltakv_prefill="chunked", **engine, **knobs)
    assert small.max_model_len == chunked
    assert len(engine_tokens(small, [prompt[:chunked - 1]], 1)[0]) == 1
    with pytest.raises(ValueError):
        small.add_request("x", prompt, greedy_params(1))


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_longest_prompt_for_the_7b_shape(bits):
    """Qwen2.5-7B's layout (28 layers, 21 compressed, 4 KV heads of 128, bf16, hidden 3584), a latent-256
    compressor, an H200's pool (1.9M vanilla slots): layer-wise holds longer prompts than chunked, more with the
    hidden states in host memory (benchmarks/bench_engine_deltakv.py --longest-prompt prints the figures)."""
    from test_engine_deltakv import seven_b_split_inputs

    from sparse_hf.engine.deltakv_store import layerwise_bytes_per_token, longest_prompt

    method, proj = seven_b_split_inputs(bits)
    vanilla = 1_900_000
    args = (vanilla * (2 * 28 * 4 * 128 * 2 + 4), method, proj, 4, 128, torch.bfloat16)
    chunked = longest_prompt(*args)
    device, host = (longest_prompt(*args, layerwise_per_token=layerwise_bytes_per_token(
        4, 128, torch.bfloat16, False, 3584, torch.bfloat16, on_host)) for on_host in (False, True))
    assert chunked < vanilla < device < host
    assert host > 1.8 * vanilla and device > 1.4 * vanilla, (chunked / vanilla, device / vanilla, host / vanilla)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_equals_tp1(arch):
    """Under TP=2 (gloo, two processes) every rank runs the layer-wise step on its heads and the flushes all-gather
    the ranks' concat(K, V) (Qwen3: pre-norm keys): TP=1's tokens, both ranks' pools whole."""
    model = tiny_model(arch, layers=4)
    knobs = dict(KNOBS, num_top_tokens=6, compressor=compressor(model), deltakv_prefill="layerwise")
    prompts = random_prompts((20, 77), seed=3)
    tp1 = engine_tokens(LLM(model, sparse_method="deltakv", **ENGINE, **knobs), prompts, 20)
    with LLM(model, tensor_parallel_size=2, sparse_method="deltakv", **ENGINE, **knobs) as llm:
        kinds = record_kinds(llm)
        tp2 = engine_tokens(llm, prompts, 20)
        assert kinds.count("layerwise") == 2
        llm.check_pool_whole()
    if tp2 != tp1:
        check_against_hf(model, prompts, tp1, knobs, 20)
        check_against_hf(model, prompts, tp2, knobs, 20)


@pytest.mark.parametrize("num_chunks,num_layers", [(1, 3), (2, 3), (5, 4)])
def test_prefetch_reads_only_saved_hidden_states(num_chunks, num_layers):
    """The CUDA host-memory path uploads a chunk ahead of its use (``_upcoming``); its copies run in issue order on
    one stream, so a prefetch is correct only if the save it reads (that chunk, the layer before) was issued first.
    Replays the pass's order of saves and prefetches (layer 0 embeds, so its chunks are saved, never loaded)."""
    from sparse_hf.engine.deltakv_layerwise import _upcoming

    chunks = [(i, i + 1) for i in range(num_chunks)]
    saved = set()                                         # (layer, chunk) whose save was issued
    prefetched = 0
    for layer in range(num_layers):
        for c, chunk in enumerate(chunks):
            if layer:
                assert (layer - 1, c) in saved                           # the load itself
                upcoming = _upcoming(chunks, layer, c, num_layers)
                if upcoming is not None:
                    target = (layer, c + 1) if c + 1 < num_chunks else (layer + 1, 0)     # the next load
                    assert upcoming == chunks[target[1]] and target[0] < num_layers
                    assert (target[0] - 1, target[1]) in saved, (layer, c, target)
                    prefetched += 1
            saved.add((layer, c))
    assert prefetched == (0 if num_chunks == 1 else (num_layers - 1) * num_chunks - 1)


def test_clear_errors():
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="deltakv_prefill='fast'"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", compressor=compressor(model), deltakv_prefill="fast")
    with pytest.raises(ValueError, match="sparse_method='deltakv' only"):
        LLM(model, num_kv_slots=64, sparse_method="snapkv", deltakv_prefill="layerwise")
    with pytest.raises(ValueError, match="sparse_method='deltakv' only"):
        LLM(model, num_kv_slots=64, layerwise_hidden_on_host=True)
    with pytest.raises(ValueError, match="layerwise_hidden_on_host='yes'"):
        LLM(model, num_kv_slots=64, sparse_method="deltakv", compressor=compressor(model),
            layerwise_hidden_on_host="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layerwise_on_cuda_with_hidden_on_host(arch):
    """On the GPU (fp32): layer-wise with the hidden states on the device and in pinned host memory (side-stream
    copies) give the same tokens, and the chunked engine's up to near-ties of the HF reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(arch, layers=4).to("cuda")
    knobs = dict(KNOBS, num_top_tokens=6, compressor=compressor(model))
    prompts = random_prompts(LENGTHS, seed=2)
    runs = {mode: engine_tokens(LLM(model, sparse_method="deltakv", deltakv_prefill=mode, **ENGINE, **knobs),
                                prompts, 20) for mode in ("chunked", "layerwise")}
    llm = LLM(model, sparse_method="deltakv", deltakv_prefill="layerwise", layerwise_hidden_on_host=True, **ENGINE,
              **knobs)
    assert engine_tokens(llm, prompts, 20) == runs["layerwise"]
    llm.pool.check_whole()
    if runs["layerwise"] != runs["chunked"]:
        check_against_hf(model, prompts, runs["layerwise"], knobs, 20)
        check_against_hf(model, prompts, runs["chunked"], knobs, 20)
