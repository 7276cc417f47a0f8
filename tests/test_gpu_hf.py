"""GPU checks of the HF path: the Triton decode kernels inside generate agree with the CPU torch path."""

import pytest
import torch

import sparse_hf  # noqa: F401
from helpers import greedy, left_padded_batch, tiny_model

pytestmark = pytest.mark.gpu

CONFIGS = {
    "streamingllm": dict(num_sink_tokens=2, num_recent_tokens=9),
    # pool_kernel_size=1: max-pooling makes exact score ties, which CPU and GPU top-k may break differently
    "snapkv": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8, window_size=4, pool_kernel_size=1),
    "pyramidkv": dict(num_sink_tokens=2, num_top_tokens=8, num_recent_tokens=8, window_size=4, pool_kernel_size=1),
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
    # GPU and CPU arithmetic differ in the last bits, so greedy paths of a random model may part after a
    # near-tie: compare the first steps' logits and most tokens.
    torch.testing.assert_close(cpu.logits[0], gpu.logits[0].cpu(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cpu.logits[1], gpu.logits[1].cpu(), atol=2e-3, rtol=2e-3)
    assert (cpu.sequences == gpu.sequences.cpu()).float().mean() > 0.9


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


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cuda_graph_decode_matches_eager(method):
    from sparse_hf import GraphDecoder, build_cache, prepare_model

    model = tiny_model("qwen2", layers=4).cuda()
    prepare_model(model)
    ids = torch.randint(1, 100, (2, 60), device="cuda")
    runs = []
    for use_graph in (False, True):
        # the eager run opts out of the default graphs; the graph run drives GraphDecoder itself
        cache = build_cache(method, model.config, {**CONFIGS[method], "cuda_graph": use_graph})
        cache.set_reserve(4)                       # small room: forces a re-capture after growth
        with torch.inference_mode():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        decoder = GraphDecoder(model, cache)
        tokens, all_logits = [], []
        for step in range(20):
            tok = logits.argmax(-1, keepdim=True)
            pos = torch.full((2, 1), 60 + step, device="cuda")
            with torch.inference_mode():
                logits = decoder.step(tok, pos) if use_graph else model(
                    input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            tokens.append(tok)
            all_logits.append(logits.clone())
        runs.append((torch.cat(tokens, 1), torch.stack(all_logits), decoder.captures))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-4, rtol=1e-4)
    # eviction caches are sized prompt-kept + reserve, so they grow and the graph is captured again
    assert runs[1][2] >= (1 if method == "omnikv" else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_generate_uses_cuda_graphs_by_default(method, dtype):
    """Graph decode is the default on CUDA and gives eager's tokens, token for token (fp32 and bf16); the first
    reservation is small, so the buffers grow and the graph is captured again past it."""
    model = tiny_model("llama", layers=4).to("cuda", dtype)
    ids, mask = left_padded_batch((50, 38))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(new_tokens=150, cache_implementation=method, return_dict_in_generate=True)
    eager = greedy(model, ids, mask, cache_config=dict(CONFIGS[method], cuda_graph=False), **kw)
    graph = greedy(model, ids, mask, cache_config=CONFIGS[method], **kw)
    assert torch.equal(eager.sequences, graph.sequences)
    assert getattr(eager.past_key_values, "graph_decoder", None) is None
    assert graph.past_key_values.graph_decoder.captures >= (1 if method == "streamingllm" else 2)


def test_cuda_graph_default_falls_back_where_unsafe():
    """Beams and output_attentions decode eagerly under the default, with no error and vanilla's tokens."""
    model = tiny_model("llama", layers=4).cuda()
    ids, mask = left_padded_batch((50, 38))
    ids, mask = ids.cuda(), mask.cuda()
    cfg = dict(num_top_tokens=1.0, num_recent_tokens=16, window_size=8)
    for extra in (dict(num_beams=2), dict(output_attentions=True, return_dict_in_generate=True)):
        ref = greedy(model, ids, mask, new_tokens=8, **extra)
        out = greedy(model, ids, mask, new_tokens=8, cache_implementation="snapkv", cache_config=cfg,
                     return_dict_in_generate=True, **{k: v for k, v in extra.items() if k != "return_dict_in_generate"})
        ref_seq = ref.sequences if hasattr(ref, "sequences") else ref
        assert (out.sequences == ref_seq).float().mean() > 0.9
        assert getattr(out.past_key_values, "graph_decoder", None) is None


def test_deltakv_gpu_matches_cpu():
    from sparse_hf.deltakv import DeltaKVCompressor

    model = tiny_model("qwen3", layers=4)
    ids, mask = left_padded_batch((48, 37))
    cfg = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
               deltakv_neighbor_count=2, num_top_tokens=6)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    kw = dict(new_tokens=10, cache_implementation="deltakv", output_logits=True, return_dict_in_generate=True)
    cpu = greedy(model, ids, mask, cache_config=dict(cfg, compressor=comp), **kw)
    gpu = greedy(model.cuda(), ids.cuda(), mask.cuda(), cache_config=dict(cfg, compressor=comp.cuda()), **kw)
    torch.testing.assert_close(cpu.logits[0], gpu.logits[0].cpu(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cpu.logits[1], gpu.logits[1].cpu(), atol=2e-3, rtol=2e-3)
    assert (cpu.sequences == gpu.sequences.cpu()).float().mean() > 0.9
