"""Minimal reproductions of what the differential fuzzer (``fuzz_differential.py``) found, each a regression test
that failed before its fix."""

import torch

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy_with_logits, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM


def test_deltakv_layerwise_prefill_then_offloaded_flush_during_decode():
    """A layer-wise DeltaKV prompt compresses inside the prefill's inference mode, so its offloaded latent buffers
    were inference tensors; the first flush during decode wrote into them in place outside inference mode and
    raised ``RuntimeError: Inplace update to inference tensor outside InferenceMode`` (fuzz seed 9011). Now every
    flush runs in inference mode, and the tokens equal the HF path's."""
    model = tiny_model("llama", layers=3)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=8)
    knobs = dict(full_attn_layers=[0], num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=8,
                 cluster_ratio=0.5, offload_latents=True)
    prompt = random_prompts((30,), seed=1)[0]
    llm = LLM(model, num_kv_slots=512, max_model_len=64, sparse_method="deltakv", deltakv_prefill="layerwise",
              compressor=comp, **knobs)
    got = engine_tokens(llm, [prompt], 12)[0]                 # the buffer refills to 2 * 4 within 12 steps: a flush
    assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 12, cache_implementation="deltakv",
                                                    cache_config=dict(knobs, compressor=comp)))
    llm.pool.check_whole()
