"""The CUDA-graph decode path's static buffers (padding rows, scratch slot, width buckets) on CPU: the graphs
are replaced by direct calls of the function they would capture, so everything but the capture itself runs."""

from types import SimpleNamespace

import pytest

from engine_helpers import engine_tokens, greedy_params, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM
from sparse_hf.engine.graphs import DecodeGraphs


class ReplayWithoutCapture(DecodeGraphs):
    def _capture(self, b: int, w: int) -> None:
        self.graphs[(b, w)] = SimpleNamespace(replay=lambda: self._forward(b, w))


@pytest.mark.parametrize("method,knobs", [
    (None, {}),
    ("snapkv", dict(num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=6, window_size=4)),
    ("streamingllm", dict(num_sink_tokens=2, num_recent_tokens=9)),
    ("omnikv", dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2")),
    ("omnikv", dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2",
                    pool_kernel_size=5)),
    ("h2o", dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=0.25)),
])
@pytest.mark.parametrize("ahead", [False, True])
def test_static_decode_path_equals_eager(method, knobs, ahead):
    model = tiny_model("qwen2", layers=4)
    prompts = random_prompts((41, 17, 66), seed=2)          # batch 3 runs the bucket-4 path with one padding row
    kw = dict(num_kv_slots=1024, max_model_len=512, max_num_seqs=6, sparse_method=method, **knobs)
    eager = engine_tokens(LLM(model, **kw), prompts, 20)
    llm = LLM(model, **kw)
    llm.runner.graphs = graphs = ReplayWithoutCapture(llm.model, llm.pool, 6, llm.runner.attention)
    llm.decode_ahead = ahead                                # launch each decode step before reading the last
    assert engine_tokens(llm, prompts, 20) == eager
    assert {b for b, _ in graphs.graphs} >= {4} and {w for _, w in graphs.graphs} == {256}
    llm.pool.check_whole()
    assert graphs.slot_mapping[:, 3:].eq(llm.pool.scratch_slot).all()     # padding rows wrote only the scratch


def test_decode_inputs_staging_and_padding():
    import numpy as np
    import torch

    from sparse_hf.engine.decode_inputs import DecodeInputs

    inputs = DecodeInputs(max_rows=4, num_groups=2, scratch_slot=99, device=torch.device("cpu"))
    inputs.stage([5, 6, 7], [10, 11, 12], [2, 0, 3], np.array([[10, 11, 12], [4, 5, 6]]), padded=4)
    assert inputs.ids.tolist() == [5, 6, 7, 0] and inputs.positions.tolist() == [10, 11, 12, 0]
    assert inputs.rows.tolist() == [2, 0, 3, 0]
    assert inputs.cols.tolist() == [[10, 11, 12, 0], [4, 5, 6, 0]]
    assert inputs.lens.dtype == torch.int32 and inputs.lens.tolist() == [[11, 12, 13, 0], [5, 6, 7, 0]]
    mapping = inputs.set_slots(torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32), padded=4)
    assert mapping.tolist() == [[1, 2, 3, 99], [4, 5, 6, 99]]
    mapping = inputs.set_slots(torch.tensor([[8], [9]], dtype=torch.int32), padded=2)    # narrower step
    assert inputs.slot_mapping.tolist() == [[8, 99, 99, 99], [9, 99, 99, 99]]            # stale slots reset


@pytest.mark.parametrize("knobs", [{}, dict(sparse_method="h2o", num_sink_tokens=1, num_recent_tokens=2,
                                             num_top_tokens=3)])
def test_decode_step_makes_no_device_tensor_from_host_lists(knobs, monkeypatch):
    """Regression: the decode step built its inputs with ``torch.tensor(list, device=...)`` (a blocking
    host-to-device copy on CUDA that waits for the GPU); now one staged copy carries them all. H2O's decode eviction
    (every step here: prompts over the budget) adds none either."""
    import torch

    model = tiny_model("qwen2", layers=2)
    llm = LLM(model, num_kv_slots=512, max_model_len=128, max_num_seqs=4, **knobs)
    for i, prompt in enumerate(random_prompts((9, 14), seed=3)):
        llm.add_request(f"r{i}", prompt, greedy_params(6))
    while any(r.in_prefill for r in llm.requests.values()) or not llm.scheduler.running:
        llm.step()
    calls = []
    for name in ("tensor", "as_tensor"):
        inner = getattr(torch, name)

        def spy(*args, _inner=inner, _name=name, **kwargs):
            if kwargs.get("device") is not None:
                calls.append(_name)
            return _inner(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    for _ in range(3):
        assert llm.step()
    assert calls == []



def _ahead_llm(model, kw, monkeypatch, launches):
    """An engine whose decode steps run through the (uncaptured) graph path, launching each step ahead."""
    import sparse_hf.engine.llm as llm_module

    llm = LLM(model, **kw)
    llm.runner.graphs = ReplayWithoutCapture(llm.model, llm.pool, kw["max_num_seqs"], llm.runner.attention)
    llm.decode_ahead = True
    inner = llm_module.launch_ahead

    def counted(*args):
        launches.append(1)
        return inner(*args)

    monkeypatch.setattr(llm_module, "launch_ahead", counted)
    return llm


@pytest.mark.parametrize("knobs", [{}, dict(sparse_method="h2o", num_sink_tokens=1, num_recent_tokens=3,
                                             num_top_tokens=4)])
def test_decode_ahead_equals_plain_steps_with_stops_and_lengths(knobs, monkeypatch):
    """Steps launched before the previous tokens are read give the same tokens and finish reasons, also when a
    request ends by a stop token (its launched-ahead work is dropped) or by max_tokens; the pool ends whole. H2O
    evicts at every step without waiting for the device, so it decodes ahead too."""
    from sparse_hf.engine import SamplingParams

    model = tiny_model("llama", layers=2)
    prompts = random_prompts((12, 30, 7), seed=5)
    kw = dict(num_kv_slots=512, max_model_len=128, max_num_seqs=4, **knobs)
    first = engine_tokens(LLM(model, **kw), prompts, 14)[1]
    k = next(i for i in range(3, 14) if first[i] not in first[:i])          # request 1 stops at step k
    params = [greedy_params(14), SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[first[k]],
                                                ignore_eos=True), greedy_params(9)]
    plain = LLM(model, **kw).generate(prompts, params)
    launches = []
    llm = _ahead_llm(model, kw, monkeypatch, launches)
    ahead = llm.generate(prompts, params)
    assert [o.token_ids for o in ahead] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in ahead] == [o.finish_reason for o in plain] == ["length", "stop", "length"]
    assert len(ahead[1].token_ids) == k + 1 and len(launches) >= 8
    llm.pool.check_whole()


def test_decode_ahead_with_abort_and_late_request(monkeypatch):
    """An abort while a step is in flight drops that row's work; a request arriving mid-way is prefilled after
    the in-flight step; outputs equal the same calls on a plain engine."""
    model = tiny_model("qwen2", layers=2)
    prompts = random_prompts((10, 21, 15), seed=6)
    kw = dict(num_kv_slots=512, max_model_len=128, max_num_seqs=4)

    def drive(llm):
        for i in range(2):
            llm.add_request(f"r{i}", prompts[i], greedy_params(12))
        outs = {}
        for n in range(40):
            if n == 6:
                llm.abort("r0")
            if n == 8:
                llm.add_request("r2", prompts[2], greedy_params(6))
            for o in llm.step():
                outs[o.request_id] = o
        return {rid: (o.token_ids, o.finish_reason) for rid, o in outs.items()}

    launches = []
    llm = _ahead_llm(model, kw, monkeypatch, launches)
    assert drive(llm) == drive(LLM(model, **kw))
    assert launches
    llm.pool.check_whole()


def test_step_outputs_share_one_prompt_copy():
    """Regression: every step's RequestOutput copied the whole prompt (~0.6 ms of host time per step at 128K)."""
    llm = LLM(tiny_model("llama", layers=2), num_kv_slots=256, max_model_len=64)
    prompt = random_prompts((20,), seed=7)[0]
    llm.add_request("r", prompt, greedy_params(4))
    req = llm.requests["r"]
    outs = [o for _ in range(4) for o in llm.step()]
    assert len(outs) >= 3 and all(o.prompt_token_ids is outs[0].prompt_token_ids for o in outs)
    assert outs[0].prompt_token_ids == prompt and outs[0].prompt_token_ids is not req.prompt_token_ids


def test_close_frees_the_pool_and_model_while_the_graphs_are_still_held():
    """``LLM.close()`` releases the graphs, and a graphs object the caller still holds (a benchmark kept
    ``llm.runner.graphs`` for its capture count: on an H200 the next engine found "only 0 KV slots fit") refers to
    neither the model nor the pool, so both are collected."""
    import gc
    import weakref

    class Replayable(ReplayWithoutCapture):
        def _capture(self, b: int, w: int) -> None:
            self.graphs[(b, w)] = SimpleNamespace(replay=lambda: self._forward(b, w), reset=lambda: None)

    llm = LLM(tiny_model("llama", layers=2), num_kv_slots=512, max_model_len=256, max_num_seqs=4)
    llm.runner.graphs = held = Replayable(llm.model, llm.pool, 4, llm.runner.attention)
    assert engine_tokens(llm, random_prompts((30, 12), seed=1), 5)
    assert held.graphs, "the static decode path did not run"
    pool, model = weakref.ref(llm.pool), weakref.ref(llm.model)
    llm.close()
    gc.collect()
    assert pool() is None and model() is None, "a held graphs object pinned the closed engine's memory"
    assert not held.graphs and held.mempool is None
