"""GPU checks of the engine (bf16, Triton decode, CUDA graphs). Skipped on CPU."""

import pytest
import torch

from engine_helpers import greedy_params, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM

pytestmark = pytest.mark.gpu


class RecordingSampler:
    """Wraps the engine's sampler and keeps every step's logits (``[B, V]``)."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def __call__(self, logits, params, steps, *args, **kwargs):
        self.logits.append(logits.detach().float().cpu())
        return self.inner(logits, params, steps, *args, **kwargs)


def engine_run(llm, prompt, steps):
    llm.sampler = recorder = RecordingSampler(llm.sampler)
    out = llm.generate([prompt], greedy_params(steps))[0]
    return out.token_ids, torch.cat(recorder.logits)


def test_bf16_greedy_and_logits_match_hf():
    model = tiny_model("qwen2", layers=4).to("cuda", torch.bfloat16)
    prompt = random_prompts((57,))[0]
    ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    llm = LLM(model, max_model_len=256, num_kv_slots=1024)
    tokens, logits = engine_run(llm, prompt, 6)
    assert tokens[:3] == ref.sequences[0, len(prompt):len(prompt) + 3].tolist()
    torch.testing.assert_close(logits[0], ref.logits[0][0].float().cpu(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("method,knobs", [
    (None, {}),
    ("snapkv", dict(num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=6, window_size=4, pool_kernel_size=1)),
    ("streamingllm", dict(num_sink_tokens=2, num_recent_tokens=9)),
    ("omnikv", dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2")),
])
def test_graphs_equal_eager(method, knobs):
    model = tiny_model("llama", layers=4).to("cuda", torch.float32)
    prompts = random_prompts((41, 17, 66), seed=2)          # batch 3 replays the bucket-4 graph with padding
    outs = []
    for eager in (True, False):
        llm = LLM(model, max_model_len=256, num_kv_slots=2048, enforce_eager=eager, sparse_method=method, **knobs)
        outs.append([o.token_ids for o in llm.generate(prompts, greedy_params(24))])
        llm.pool.check_whole()
    assert outs[0] == outs[1]
    assert llm.runner.graphs.graphs, "no CUDA graph was captured"


def test_pool_sized_from_memory_utilization():
    model = tiny_model("llama", layers=2).to("cuda", torch.bfloat16)
    llm = LLM(model, max_model_len=4096, gpu_memory_utilization=0.2, max_num_batched_tokens=2048,
              chunk_prefill_size=1024)
    assert llm.pool.num_slots > 4096
    out = llm.generate(random_prompts((3000, 20)), greedy_params(4))
    assert all(len(o.token_ids) == 4 for o in out)


@pytest.mark.parametrize("method,knobs", [
    (None, {}),
    ("snapkv", dict(num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=6, window_size=4)),
])
def test_close_returns_gpu_memory_for_the_next_engine(method, knobs):
    """Two engines sized from ``gpu_memory_utilization`` one after the other in one process: the second one finds
    the first one's pool, weights and CUDA graphs freed. On the H200 (2026-12-02) the second engine of
    ``bench_engine_deltakv.py`` found "only 0 KV slots fit" because the first one's memory was still held."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    slots = []
    for _ in range(2):
        llm = LLM(tiny_model("llama", layers=2).to("cuda", torch.bfloat16), max_model_len=512,
                  gpu_memory_utilization=0.6, sparse_method=method, **knobs)
        assert llm.generate(random_prompts((40, 9), seed=3), greedy_params(6))[0].token_ids
        assert llm.runner.graphs is not None and llm.runner.graphs.graphs, "no CUDA graph was captured"
        slots.append(llm.pool.num_slots)
        held = llm.runner.graphs        # a handle kept past close() (bench_engine_deltakv.py did): must pin nothing
        llm.close()
        assert torch.cuda.memory_allocated() - base < 64 * 2**20, "the closed engine still holds GPU memory"
        assert held.model is None and held.pool is None
        del held
    assert slots[1] >= 0.95 * slots[0]
