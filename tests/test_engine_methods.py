"""Sparse methods in the engine equal the HF path's same method and knobs (greedy, CPU fp32), and eviction
really returns slots to the pool."""

import pytest

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import (assert_greedy_equal, engine_tokens, greedy_params, hf_greedy, hf_greedy_with_logits,
                            peak_decoding_rows, random_prompts)
from helpers import tiny_model
from sparse_hf.engine import LLM

KNOBS = {
    "streamingllm": dict(num_sink_tokens=4, num_recent_tokens=16),
    "snapkv": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=8, window_size=8),
    "pyramidkv": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=8, window_size=8),
    "knorm": dict(num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=0.2),
    "omnikv": dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, full_attn_layers=[0, 2]),
    "h2o": dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8),
}
LENGTHS = (20, 50, 77)


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_engine_equals_hf_path(method):
    model = tiny_model("llama", layers=4)
    prompts = random_prompts(LENGTHS)
    llm = LLM(model, num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16, sparse_method=method,
              **KNOBS[method])
    ours = engine_tokens(llm, prompts, 40)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 40, cache_implementation=method,
                                                        cache_config=KNOBS[method]))
    vanilla = [hf_greedy(model, p, 40) for p in prompts]
    assert ours != vanilla, "knobs too loose: the method changed nothing, so the test would prove nothing"
    llm.pool.check_whole()


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "knorm", "streamingllm"])
def test_eviction_frees_slots(method):
    """After the prompt, a row holds only its budget in each layer, so more requests fit."""
    model = tiny_model("qwen2", layers=4)
    prompt = random_prompts((90,), seed=7)[0]
    llm = LLM(model, num_kv_slots=128, max_model_len=128, sparse_method=method, **KNOBS[method])
    llm.add_request("a", prompt, greedy_params(3))
    llm.step()                                               # the whole prompt, then its eviction
    kept = [int(llm.pool.lens[g, llm.requests["a"].row]) for g in range(llm.pool.num_groups)]
    assert max(kept) < 90 and llm.pool.free_top == [128 - k for k in kept]
    llm.add_request("b", prompt, greedy_params(3))          # would not fit next to a full 90-token row
    done = {}
    while llm.has_unfinished_requests():
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    assert sorted(done) == ["a", "b"] and all(o.metrics["num_preemptions"] == 0 for o in done.values())
    llm.pool.check_whole()


def test_eviction_lets_more_requests_run_together():
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((60, 60, 60, 60), seed=8)
    def peak_running(**kw):
        return peak_decoding_rows(LLM(model, num_kv_slots=160, max_model_len=128, chunk_prefill_size=64, **kw),
                                  prompts, 6)
    assert peak_running(sparse_method="snapkv", **KNOBS["snapkv"]) > peak_running()


def test_omnikv_triton_observation_path_gives_the_torch_tokens():
    """An OmniKV observation layer through the Triton kernels (K/V read in place through the slot table, the
    scores by ``range_softmax_max``'s two passes) gives the torch references' tokens: on CUDA when there is one,
    else under the Triton interpreter on CPU."""
    import os

    import torch

    from sparse_hf.kernels import HAS_TRITON

    cuda = torch.cuda.is_available()
    if not HAS_TRITON or not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton, and CUDA or TRITON_INTERPRET=1")
    model = tiny_model("llama", layers=4).to("cuda" if cuda else "cpu")
    prompts = random_prompts((41, 23, 30), seed=6)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, num_kv_slots=1024, max_model_len=128, chunk_prefill_size=16, enforce_eager=True,
                  sparse_method="omnikv", **KNOBS["omnikv"])
        llm.runner.attention.backend = backend
        tokens[backend] = engine_tokens(llm, prompts, 10)
        llm.pool.check_whole()
    assert tokens["triton"] == tokens["torch"]
