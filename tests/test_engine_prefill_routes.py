"""The engine's prefill routes give the same greedy outputs (CPU fp32): the SDPA route over gathered slots (CPU
default), the paged kernel (its torch reference, and the Triton kernel under the interpreter) and the split SDPA
route (unmasked prefix + square-causal self, merged by log-sum-exp; its CUDA-only SDPA ops replaced here by an exact
math stand-in)."""

import pytest
import torch

from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM, attention
from sparse_hf.kernels import sdpa_split
from sparse_hf.engine.attention import chunk_attention

KNOBS = dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, window_size=8)


def math_sdpa(kernel, q, k, v, causal, scale):
    """What the fused SDPA ops return (cuDNN: GQA allowed), in plain torch: ``(out, natural-log lse)``."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
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


def routes_tokens(method, routes, prompts, new_tokens=6):
    model = tiny_model("llama", layers=2)
    tokens = {}
    for route, backend in routes:
        llm = LLM(model, num_kv_slots=512, max_model_len=96, chunk_prefill_size=16, max_num_batched_tokens=24,
                  sparse_method=method, **(KNOBS if method else {}))
        llm.runner.attention.prefill_route = route
        llm.runner.attention.backend = backend             # "triton": the paged kernel under the interpreter
        tokens[route, backend] = engine_tokens(llm, prompts, new_tokens)
        assert llm.runner.attention.prefill_route == route
        llm.pool.check_whole()
    return tokens


@pytest.mark.parametrize("method", [None, "snapkv"], ids=["vanilla", "snapkv"])
def test_prefill_routes_give_equal_outputs(method, split_on_cpu, monkeypatch):
    """Chunked prompts (several chunks per prompt, several prompts per step) with mixed steps; snapkv also checks
    the observation-window queries each route records. ``auto`` splits the chunks of at least 12 queries here and
    runs the others through one paged launch."""
    monkeypatch.setattr(attention, "SPLIT_MIN_QUERIES", 12)
    prompts = random_prompts((37, 21, 50), seed=7)
    tokens = routes_tokens(method, [("gather", "torch"), ("paged", "torch"), ("paged", "triton"),
                                    ("split", "torch"), ("auto", "torch")], prompts)
    first = tokens["gather", "torch"]
    assert all(t == first for t in tokens.values()), tokens


def test_auto_route_falls_back_to_paged_without_cudnn(monkeypatch):
    """Where no cuDNN kernel takes the split route, ``auto`` runs the paged kernel from then on (same output)."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("stand-in: no cuDNN here")

    monkeypatch.setattr(sdpa_split, "_call", no_kernel)
    monkeypatch.setattr(sdpa_split, "_working", {})
    monkeypatch.setattr(attention, "SPLIT_MIN_QUERIES", 12)
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((37, 21), seed=8)
    llm = LLM(model, num_kv_slots=512, max_model_len=96, chunk_prefill_size=16)
    llm.runner.attention.prefill_route = "auto"
    got = engine_tokens(llm, prompts, 5)
    assert llm.runner.attention.prefill_route == "paged"
    assert got == engine_tokens(LLM(model, num_kv_slots=512, max_model_len=96, chunk_prefill_size=16), prompts, 5)
    llm.runner.attention.prefill_route = "split"
    with pytest.raises(sdpa_split.SplitUnavailable, match="paged"):
        engine_tokens(llm, prompts[:1], 1)


@pytest.mark.gpu
def test_gpu_split_route_matches_chunk_attention():
    """On CUDA the real fused kernels (cuDNN, else flash) and their log-sum-exp: bf16, Qwen2.5-7B heads."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1000, 28, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(5000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(5000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    got = sdpa_split.split_chunk_attention(q, k[:4000], v[:4000], k[4000:], v[4000:], 128 ** -0.5)
    torch.testing.assert_close(got.float(), chunk_attention(q, k, v, 128 ** -0.5).float(), atol=2e-2, rtol=2e-2)


def test_split_route_refused_by_torch_checks_on_cpu(monkeypatch):
    """Without the stand-in, torch's own eligibility check refuses cuDNN for CPU tensors: a clear SplitUnavailable."""
    monkeypatch.setattr(sdpa_split, "_working", {})
    q, k = torch.randn(4, 6, 16), torch.randn(9, 2, 16)
    with pytest.raises(sdpa_split.SplitUnavailable, match="cudnn"):
        sdpa_split.split_chunk_attention(q, k[:5], k[:5], k[5:], k[5:], 0.25)


def test_default_route_takes_sdpa_for_fp32_where_triton_runs(monkeypatch):
    """Where the Triton kernels run (CUDA, faked here), an fp32 pool prefills through SDPA on gathered slots
    (FP32_PREFILL_ROUTE), bf16/fp16 through "auto" (split cuDNN / paged); without Triton, "gather" whatever the
    dtype; FP32_PREFILL_ROUTE=None restores the dtype-blind choice."""
    fp32, bf16 = torch.zeros(2, 1, 4), torch.zeros(2, 1, 4, dtype=torch.bfloat16)
    assert attention.default_prefill_route(fp32) == attention.default_prefill_route(bf16) == "gather"
    monkeypatch.setattr(attention, "kernels_run_fused", lambda t: True)
    assert attention.default_prefill_route(fp32) == "gather"
    assert attention.default_prefill_route(bf16) == "auto"
    monkeypatch.setattr(attention, "FP32_PREFILL_ROUTE", None)
    assert attention.default_prefill_route(fp32) == "auto"


@pytest.mark.gpu
def test_gpu_fp32_chunk_attention_matches_float64():
    """fp32 on CUDA (KV heads repeated for the memory-efficient kernel): a chunk of 700 queries at the end of 3000
    keys, lower-right causal, against float64 on the CPU; SmolLM2's heads (9 query heads, 3 KV heads, dim 64)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(700, 9, 64, device="cuda", generator=g)
    k = torch.randn(3000, 3, 64, device="cuda", generator=g)
    v = torch.randn(3000, 3, 64, device="cuda", generator=g)
    qd, kd, vd = (t.double().cpu().transpose(0, 1) for t in (q, k, v))                      # [heads, len, 64]
    kd, vd = kd.repeat_interleave(3, 0), vd.repeat_interleave(3, 0)
    visible = torch.arange(3000).view(1, -1) <= torch.arange(2300, 3000).view(-1, 1)        # [700, 3000]
    s = (qd @ kd.transpose(1, 2) * 0.125).masked_fill(~visible, float("-inf"))
    want = (torch.softmax(s, -1) @ vd).transpose(0, 1)                                      # [700, 9, 64]
    torch.testing.assert_close(chunk_attention(q, k, v, 0.125).double().cpu(), want, atol=1e-4, rtol=1e-4)
