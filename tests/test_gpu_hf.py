"""GPU checks of the HF path: the Triton decode kernels inside generate agree with the CPU torch path."""

import pytest
import torch

import sparse_hf  # noqa: F401
from helpers import greedy, left_padded_batch, tiny_model
from sparse_hf.hf import cache as hf_cache
from sparse_hf.hf import selection_cache as hf_selection_cache
from sparse_hf.methods import METHODS
from test_multiturn import configs as method_configs
from transformers import LogitsProcessor, LogitsProcessorList

pytestmark = pytest.mark.gpu

CONFIGS = {
    "streamingllm": dict(num_sink_tokens=2, num_recent_tokens=9),
    # pool_kernel_size=1: max-pooling makes exact score ties, which CPU and GPU top-k may break differently
    "snapkv": dict(num_sink_tokens=2, num_top_tokens=6, num_recent_tokens=8, window_size=4, pool_kernel_size=1),
    "pyramidkv": dict(num_sink_tokens=2, num_top_tokens=8, num_recent_tokens=8, window_size=4, pool_kernel_size=1),
    "omnikv": dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2"),
}
NEW_TOKENS = 24

#: Near-tie thresholds, relative to the largest |logit| of the row at that step. bf16 keeps 8 significant bits, so
#: one rounding moves a value by up to 2**-8 of its size (half an ulp). Our Triton decode kernel and SDPA both sum in
#: float32 but in other orders, so their bf16 attention outputs may differ by an ulp; the next layers re-round that
#: difference at every residual add, norm and projection. 2**-5 (four ulps at the top of the logit range, i.e. a
#: few roundings on each of the two logits compared) covers that and nothing larger: a real difference between the
#: caches (a missing token, a wrong position) moves logits by far more on this model (see test_eviction's oracles).
#: Measured on an H200 (benchmarks/gpu_unlimited_diag.py, 2026-12-02): with the Triton decode, every method's largest
#: |ours - DynamicCache| over 24 steps x 2 rows was 0.0029, 0.68% of the largest |logit| (under one ulp there), and
#: no argmax differed; with SDPA decode every method but DeltaKV was bitwise equal (the strict test below).
BF16_TIE_REL = 2.0**-5
#: float32 against float32 on another device: the same reasoning with 24 significant bits gives ~1e-6; 1e-4 leaves room
#: for the longer reduction chains of the GPU kernels and matches ``engine_helpers.assert_greedy_equal``.
FP32_TIE_REL = 1e-4


class ForceTokens(LogitsProcessor):
    """Makes ``generate`` pick ``sequences[:, t]`` at step ``t`` (teacher forcing); the raw logits that
    ``output_logits`` returns are the model's own."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = self.sequences[:, input_ids.shape[1]].to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, forced[:, None], 0.0)


def teacher_forced_logits(model, ids, mask, sequences, **kwargs) -> torch.Tensor:
    """``[B, n, V]`` float32: the raw logits of ``generate`` decoding along ``sequences`` (prompt ``ids`` + ``n``
    tokens), so that a cache is compared with the reference on the reference's own path at every step."""
    n = sequences.shape[1] - ids.shape[1]
    out = greedy(model, ids, mask, new_tokens=n, logits_processor=LogitsProcessorList([ForceTokens(sequences)]),
                 output_logits=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, sequences)
    return torch.stack(out.logits, 1).float()


def assert_argmax_within_ties(ours: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> None:
    """``ours``, ``ref``: ``[B, n, V]`` logits on the same token path. Wherever our argmax differs from the
    reference's, the reference's margin between its choice and ours is at most ``rel_tol`` times the row's largest
    |logit| (a near-tie that rounding may flip); anything larger fails with the step and the margin."""
    got, want = ours.argmax(-1), ref.argmax(-1)
    for b, t in (got != want).nonzero().tolist():
        row = ref[b, t]
        margin = float(row[want[b, t]] - row[got[b, t]])
        tol = rel_tol * max(1e-6, float(row.abs().max()))
        assert margin <= tol, (f"row {b}, step {t}: ours {int(got[b, t])}, reference {int(want[b, t])}, reference "
                               f"margin {margin:.4g} > near-tie tolerance {tol:.4g} ({(got != want).sum()} of "
                               f"{got.numel()} steps differ)")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_gpu_matches_cpu(method):
    """float32, small budgets: the GPU (Triton decode kernels, CUDA graphs) decoded along the CPU's tokens gives the
    CPU's logits; where its argmax differs, the CPU's own top two were within float32 rounding (a near-tie)."""
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((56, 41))
    kw = dict(cache_implementation=method, cache_config=CONFIGS[method])
    cpu = greedy(model, ids, mask, new_tokens=8, output_logits=True, return_dict_in_generate=True, **kw)
    gpu = teacher_forced_logits(model.cuda(), ids.cuda(), mask.cuda(), cpu.sequences.cuda(), **kw).cpu()
    ref = torch.stack(cpu.logits, 1)
    torch.testing.assert_close(gpu[:, :2], ref[:, :2], atol=2e-3, rtol=2e-3)
    assert_argmax_within_ties(gpu, ref, FP32_TIE_REL)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpu_unlimited_matches_dynamic_cache_bf16(method):
    """The README's promise on CUDA in bf16, for every method at a budget that keeps everything, on the default path
    (Triton decode kernels, CUDA graphs): decoded along DynamicCache's greedy tokens (teacher forcing), our cache
    picks DynamicCache's token at every step, except where DynamicCache's own top two logits are a near-tie
    (``BF16_TIE_REL``). The prompt step runs the same SDPA call on the same K/V in both, so its logits are equal
    bit for bit."""
    model = tiny_model("llama", layers=4).to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch((56, 41))
    ids, mask = ids.cuda(), mask.cuda()
    ref = greedy(model, ids, mask, new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    ours = teacher_forced_logits(model, ids, mask, ref.sequences, cache_implementation=method,
                                 cache_config=method_configs(model, unlimited=True)[method])
    ref_logits = torch.stack(ref.logits, 1).float()
    assert torch.equal(ours[:, 0], ref_logits[:, 0])
    assert_argmax_within_ties(ours, ref_logits, BF16_TIE_REL)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"deltakv"}))
def test_gpu_unlimited_torch_decode_is_bitwise_dynamic_cache_bf16(method, monkeypatch):
    """Where the kernels are the same, the output is the same: with the Triton decode kernels switched off (decode
    through SDPA, as on CPU), every method but DeltaKV (whose reconstruction ``up(down(x) - down(ref)) + ref``
    rounds in bf16) gives DynamicCache's tokens and logits bit for bit. So the near-ties accepted above come from
    our Triton decode kernel's summation order against SDPA's, not from the caches."""
    for module in (hf_cache, hf_selection_cache):
        monkeypatch.setattr(module, "kernels_run_fused", lambda t: False)
    model = tiny_model("llama", layers=4).to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch((56, 41))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    ref = greedy(model, ids, mask, **kw)
    ours = greedy(model, ids, mask, cache_implementation=method,
                  cache_config=dict(method_configs(model, unlimited=True)[method], cuda_graph=False), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        assert torch.equal(a, b)


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
    cpu = greedy(model, ids, mask, new_tokens=10, cache_implementation="deltakv", output_logits=True,
                 return_dict_in_generate=True, cache_config=dict(cfg, compressor=comp))
    gpu = teacher_forced_logits(model.cuda(), ids.cuda(), mask.cuda(), cpu.sequences.cuda(),
                                cache_implementation="deltakv", cache_config=dict(cfg, compressor=comp.cuda())).cpu()
    ref = torch.stack(cpu.logits, 1)
    torch.testing.assert_close(gpu[:, :2], ref[:, :2], atol=2e-3, rtol=2e-3)
    assert_argmax_within_ties(gpu, ref, FP32_TIE_REL)
