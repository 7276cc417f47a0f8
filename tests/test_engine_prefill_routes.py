"""The engine's prefill routes give the same greedy outputs (CPU fp32): the SDPA route over gathered slots (CPU
default), the paged kernel (its torch reference, and the Triton kernel under the interpreter) and the split SDPA
route (unmasked prefix + square-causal self, merged by log-sum-exp; its CUDA-only SDPA ops replaced here by an exact
math stand-in)."""

import pytest
import torch

from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM, sdpa_split
from sparse_hf.engine.attention import chunk_attention

KNOBS = dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, window_size=8)


def math_sdpa(kernel, q, k, v, causal, scale):
    """What the fused SDPA ops return, in plain torch: ``(out, natural-log lse)``; refuses fewer KV heads like a
    kernel without GQA would (so the head-repeat fallback runs too)."""
    if k.shape[1] != q.shape[1]:
        raise RuntimeError("stand-in: no GQA")
    s = q.float() @ k.float().transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)


@pytest.fixture
def split_on_cpu(monkeypatch):
    monkeypatch.setattr(sdpa_split, "_call", math_sdpa)
    monkeypatch.setattr(sdpa_split, "_working", {})


def test_split_chunk_attention_equals_lower_right_causal(split_on_cpu):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 6, 16, generator=g), torch.randn(19, 2, 16, generator=g), torch.randn(19, 2, 16, generator=g)
    want = chunk_attention(q, k, v, 0.3)
    got = sdpa_split.split_chunk_attention(q, k[:12], v[:12], k[12:], v[12:], 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    first = sdpa_split.split_chunk_attention(q, k[:0], v[:0], k[:7], v[:7], 0.3)        # a prompt's first chunk
    torch.testing.assert_close(first, chunk_attention(q, k[:7], v[:7], 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [None, "snapkv"], ids=["vanilla", "snapkv"])
def test_prefill_routes_give_equal_outputs(method, split_on_cpu):
    """Chunked prompts (several chunks per prompt, several prompts per step) with mixed steps; snapkv also checks
    the observation-window queries each route records."""
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((37, 21, 50), seed=7)
    tokens = {}
    for route, backend in (("gather", "torch"), ("paged", "torch"), ("paged", "triton"), ("split", "torch")):
        llm = LLM(model, num_kv_slots=512, max_model_len=96, chunk_prefill_size=16, max_num_batched_tokens=24,
                  sparse_method=method, **(KNOBS if method else {}))
        llm.runner.attention.prefill_route = route
        if route == "paged":
            llm.runner.attention.backend = backend         # "triton": the kernel under the interpreter
        tokens[route, backend] = engine_tokens(llm, prompts, 6)
        llm.pool.check_whole()
    first = tokens["gather", "torch"]
    assert all(t == first for t in tokens.values()), tokens


@pytest.mark.gpu
def test_gpu_split_route_matches_chunk_attention():
    """On CUDA the real fused kernels (cuDNN, else flash) and their log-sum-exp: bf16, Qwen2.5-7B heads."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1000, 28, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(5000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(5000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    got = sdpa_split.split_chunk_attention(q, k[:4000], v[:4000], k[4000:], v[4000:], 128 ** -0.5)
    torch.testing.assert_close(got.float(), chunk_attention(q, k, v, 128 ** -0.5).float(), atol=2e-2, rtol=2e-2)
