"""Preemption changes no output, for every method the engine runs (CPU fp32, tiny models).

A preempted request is recomputed. Full attention recomputes its prompt and generated tokens as one prompt (exact);
a sparse method's decode differs from its prefill (evictions, decode-time scores, DeltaKV's flushes and rebuilt
tokens, H2O's accumulated scores, OmniKV's per-step picks), so the engine prefills the prompt again and replays the
generated tokens as decode steps. Either way a request's output must not depend on the memory pressure of other
rows: a tight pool that preempts gives the outputs of a roomy pool that never does, greedy or seeded, at TP=1 or 2,
and streaming (``llm.step()``) shows each token once.
"""

import warnings
from types import SimpleNamespace

import pytest

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import greedy_params, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM, SamplingParams
from test_engine_deltakv import KNOBS as DELTAKV_KNOBS, compressor
from test_engine_methods import KNOBS

NEW_TOKENS = 24
#: Requests of similar lengths: rows grow while decoding until the pool is short (every method that keeps growing).
GROWING = (60, 45, 70, 30, 52, 40)
#: Long prompts first, short ones after: the short ones decode while the long ones prefill (holding a slot per
#: token until their eviction), so decoding rows are preempted (for methods whose rows stop growing at a budget).
BOUNDED = (70, 60, 12, 10, 14, 9)
#: H2O with a small budget (its outputs then depend on what it evicted while decoding).
H2O = dict(num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=4)
#: method -> (engine knobs, prompt lengths, slots of the tight pool). Each tight pool preempts requests that had
#: generated tokens (checked). Every case but vanilla's fails without replay (the recompute as a prompt changed an
#: output; the h2o case needs its small budget for that).
CASES = {
    "vanilla": ({}, GROWING, 160),
    "streamingllm": (KNOBS["streamingllm"], (70, 60, 30, 20, 24, 18), 140),
    "snapkv": (KNOBS["snapkv"], GROWING, 200),
    "pyramidkv": (KNOBS["pyramidkv"], GROWING, 160),
    "knorm": (KNOBS["knorm"], GROWING, 250),
    "omnikv": (KNOBS["omnikv"], GROWING, 200),
    "h2o": (H2O, BOUNDED, 90),
    "deltakv": ("deltakv", GROWING, 160),
    "deltakv_layerwise": ("deltakv", GROWING, 250),
}


def method_knobs(name: str, model) -> dict:
    """``LLM`` keyword arguments of case ``name`` (``sparse_method`` and its knobs)."""
    knobs = CASES[name][0]
    if knobs == "deltakv":
        knobs = dict(DELTAKV_KNOBS, full_attn_layers=[0], num_top_tokens=4, compressor=compressor(model))
        if name == "deltakv_layerwise":
            knobs["deltakv_prefill"] = "layerwise"
        return dict(knobs, sparse_method="deltakv")
    return dict(knobs, sparse_method=name) if name != "vanilla" else {}


def engine(model, slots: int, **kwargs) -> LLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # max_model_len capped to the pool (full attention)
        return LLM(model, num_kv_slots=slots, max_model_len=256, chunk_prefill_size=16, max_num_seqs=6,
                   **kwargs)


def record_preemptions(llm) -> list:
    """Wrap the scheduler's preemption: the returned list gets, per preemption, the victim's ``(generated tokens,
    computed tokens, prompt length)`` at that moment."""
    log, preempt = [], llm.scheduler.preempt_newest

    def recording():
        victim = max(llm.scheduler.running, key=lambda r: r.arrival_time)
        log.append((len(victim.output_token_ids), victim.num_computed, len(victim.prompt_token_ids)))
        preempt()
    llm.scheduler.preempt_newest = recording
    return log


def tight_and_roomy(name: str, params, slots: int | None = None, **kwargs):
    """``(tight outputs, roomy outputs, tight preemption log)`` of case ``name`` with ``params``."""
    model = tiny_model("llama", layers=4)
    knobs = method_knobs(name, model)
    _, lengths, tight_slots = CASES[name]
    prompts = random_prompts(lengths, seed=4)
    roomy = engine(model, 2048, **knobs, **kwargs)
    ref = roomy.generate(prompts, params)
    assert not any(o.metrics["num_preemptions"] for o in ref)
    tight = engine(model, slots or tight_slots, **knobs, **kwargs)
    log = record_preemptions(tight)
    outs = tight.generate(prompts, params)
    tight.check_pool_whole()
    return outs, ref, log


@pytest.mark.parametrize("name", sorted(CASES))
def test_preemption_changes_no_greedy_output(name):
    outs, ref, log = tight_and_roomy(name, greedy_params(NEW_TOKENS))
    assert all(len(o.token_ids) == NEW_TOKENS for o in outs + ref)
    assert sum(o.metrics["num_preemptions"] for o in outs) == len(log) > 0
    assert any(generated > 1 for generated, _, _ in log), "no request was preempted after decoding: nothing tested"
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_a_request_preempted_while_replaying_starts_over():
    """Preempted again mid-replay (some generated tokens fed back, not all), a request replays from its prompt."""
    outs, ref, log = tight_and_roomy("omnikv", greedy_params(NEW_TOKENS), slots=120)
    assert any(prompt < computed < prompt + generated - 1 for generated, computed, prompt in log), log
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_seeded_sampling_under_preemption_equals_the_roomy_run():
    """A seeded request's noise depends on ``(seed, step)``; replayed tokens are not sampled, so the new tokens
    after a preemption draw what they would have drawn."""
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, max_tokens=NEW_TOKENS,
                             ignore_eos=True) for i in range(len(GROWING))]
    outs, ref, log = tight_and_roomy("snapkv", params)
    assert any(generated > 1 for generated, _, _ in log)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    model = tiny_model("llama", layers=4)
    greedy = engine(model, 2048, **method_knobs("snapkv", model)).generate(random_prompts(GROWING, seed=4),
                                                                           greedy_params(NEW_TOKENS))
    assert [o.token_ids for o in outs] != [o.token_ids for o in greedy], "sampling changed nothing"


def test_streaming_shows_each_token_once():
    """Through ``llm.step()``: a request appears only when it got a new token, with exactly one token more than
    the last time (none during its replay), and ends with the roomy run's tokens."""
    model = tiny_model("llama", layers=4)
    knobs = method_knobs("deltakv", model)
    prompts = random_prompts(GROWING, seed=4)
    ref = [o.token_ids for o in engine(model, 2048, **knobs).generate(prompts, greedy_params(NEW_TOKENS))]
    llm = engine(model, CASES["deltakv"][2], **knobs)
    log = record_preemptions(llm)
    for i, prompt in enumerate(prompts):
        llm.add_request(str(i), prompt, greedy_params(NEW_TOKENS))
    seen = {str(i): [] for i in range(len(prompts))}
    while llm.has_unfinished_requests():
        for out in llm.step():
            assert out.token_ids[:-1] == seen[out.request_id], (out.request_id, out.token_ids, seen[out.request_id])
            seen[out.request_id] = out.token_ids
    assert any(generated > 1 for generated, _, _ in log)
    assert [seen[str(i)] for i in range(len(prompts))] == ref
    llm.check_pool_whole()


def test_tp2_under_preemption_equals_tp1():
    """The replayed tokens travel in the step plans like any decode input: TP=2 under preemption equals TP=1."""
    model = tiny_model("llama", layers=4)
    knobs = method_knobs("snapkv", model)
    prompts = random_prompts(GROWING, seed=4)
    tp1 = [o.token_ids for o in engine(model, 2048, **knobs).generate(prompts, greedy_params(NEW_TOKENS))]
    with engine(model, CASES["snapkv"][2], tensor_parallel_size=2, **knobs) as llm:
        log = record_preemptions(llm)
        outs = llm.generate(prompts, greedy_params(NEW_TOKENS))
        llm.check_pool_whole()
    assert any(generated > 1 for generated, _, _ in log)
    assert [o.token_ids for o in outs] == tp1


def uncaptured_graphs(llm):
    """The engine's CUDA-graph decode path on CPU: its static inputs and bookkeeping, each "graph" replayed by
    running the step it would capture (as in ``test_engine_graphs`` and ``test_engine_deltakv``)."""
    from sparse_hf.engine.deltakv_graphs import DeltaKVGraphs
    from test_engine_graphs import ReplayWithoutCapture

    if llm.method is None or llm.method.name != "deltakv":
        return ReplayWithoutCapture(llm.model, llm.pool, llm.config.max_num_seqs, llm.runner.attention)

    class Uncaptured(DeltaKVGraphs):
        def _capture(self, key):
            b, w = len(key[0]), key[-1]
            self.graph, self.key = SimpleNamespace(replay=lambda: self._forward(b, w)), key
    return Uncaptured(llm.model, llm.pool, llm.runner.attention)


@pytest.mark.parametrize("name", ["snapkv", "omnikv", "deltakv"])
def test_graph_path_and_decode_ahead_with_replaying_rows(monkeypatch, name):
    """Replayed tokens are staged like any decode input, so graph steps run replaying rows; decode-ahead (whose
    next ids come from the sampler on the device) never launches while a row replays, and runs again after."""
    import sparse_hf.engine.llm as llm_module

    model = tiny_model("llama", layers=4)
    knobs = method_knobs(name, model)
    _, lengths, slots = CASES[name]
    prompts = random_prompts(lengths, seed=4)
    ref = [o.token_ids for o in engine(model, 2048, **knobs).generate(prompts, greedy_params(NEW_TOKENS))]
    llm = engine(model, slots, **knobs)
    graphs = llm.runner.graphs = uncaptured_graphs(llm)
    llm.decode_ahead = True
    log = record_preemptions(llm)
    launches, replaying_graph_steps = [], []
    launch, run = llm_module.launch_ahead, graphs.run

    def checked_launch(engine_, batch, tokens):
        assert not any(r.replaying for r in engine_.scheduler.running)
        launches.append(len(batch))
        return launch(engine_, batch, tokens)

    def counted_run(*args):
        replaying_graph_steps.append(any(r.replaying for r in llm.scheduler.running))   # rows of this step
        return run(*args)
    monkeypatch.setattr(llm_module, "launch_ahead", checked_launch)
    monkeypatch.setattr(graphs, "run", counted_run)
    outs = llm.generate(prompts, greedy_params(NEW_TOKENS))
    llm.check_pool_whole()
    assert any(generated > 1 for generated, _, _ in log)
    assert any(replaying_graph_steps) and launches
    assert [o.token_ids for o in outs] == ref


@pytest.mark.gpu
def test_gpu_graph_decode_with_replaying_rows():
    """On CUDA (graphs, decode-ahead): replaying rows run in graph-captured decode steps (their forced ids staged
    like any step input; decode-ahead waits while a row replays) and change no greedy output."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama", layers=4).cuda()
    for name in ("snapkv", "omnikv", "deltakv"):
        knobs = method_knobs(name, model)
        _, lengths, slots = CASES[name]
        prompts = random_prompts(lengths, seed=4)
        ref = [o.token_ids for o in engine(model, 2048, **knobs).generate(prompts, greedy_params(NEW_TOKENS))]
        llm = engine(model, slots, **knobs)
        assert llm.runner.graphs is not None and llm.decode_ahead
        log = record_preemptions(llm)
        outs = llm.generate(prompts, greedy_params(NEW_TOKENS))
        llm.check_pool_whole()
        assert any(generated > 1 for generated, _, _ in log), name
        assert [o.token_ids for o in outs] == ref, name
