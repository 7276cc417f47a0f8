"""GPU checks of the HF path: the Triton decode kernels inside generate agree with the CPU torch path."""

import pytest
import torch

import sparse_hf  # noqa: F401
from helpers import greedy, left_padded_batch, tiny_model

pytestmark = pytest.mark.gpu

CONFIGS = {
    "streamingllm": dict(num_sink_tokens=2, num_recent_tokens=9),
    "snapkv": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8, window_size=4, pool_kernel_size=3),
    "pyramidkv": dict(num_sink_tokens=2, num_top_tokens=8, num_recent_tokens=8, window_size=4),
    "omnikv": dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2"),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_gpu_matches_cpu(method):
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((56, 41))
    kw = dict(new_tokens=8, cache_implementation=method, cache_config=CONFIGS[method], output_logits=True,
              return_dict_in_generate=True)
    cpu = greedy(model, ids, mask, **kw)
    gpu = greedy(model.cuda(), ids.cuda(), mask.cuda(), **kw)
    assert torch.equal(cpu.sequences, gpu.sequences.cpu())
    for a, b in zip(cpu.logits, gpu.logits):
        torch.testing.assert_close(a, b.cpu(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method", ["snapkv", "omnikv"])
def test_gpu_unlimited_matches_vanilla_bf16(method):
    model = tiny_model("llama", layers=4).to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    ref = greedy(model, ids, mask, new_tokens=8)
    cfg = dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8)
    if method == "omnikv":
        cfg = dict(num_top_tokens=1.0, full_attn_layers="0,1")
    out = greedy(model, ids, mask, new_tokens=8, cache_implementation=method, cache_config=cfg)
    assert (out == ref).float().mean() > 0.9
