"""The engine against HF ``generate`` (greedy, CPU fp32): models, weights loading, chunking, joining, preemption,
bad input."""

import pytest
import torch

import sparse_hf
from engine_helpers import (assert_greedy_equal, engine_tokens, greedy_params, hf_greedy, hf_greedy_with_logits,
                            random_prompts)
from helpers import ARCHS, tiny_model
from sparse_hf.engine import LLM, RequestOutput

LENGTHS = (5, 23, 61, 40)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_mixed_lengths(arch):
    model = tiny_model(arch)
    prompts = random_prompts(LENGTHS)
    llm = LLM(model, num_kv_slots=512, max_model_len=128, chunk_prefill_size=16)
    ours = engine_tokens(llm, prompts, 12)
    for prompt, got in zip(prompts, ours):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 12))
    llm.pool.check_whole()


def test_rope_scaling_matches_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=512, head_dim=16,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    prompts = random_prompts((30, 9), seed=3)
    llm = LLM(model, num_kv_slots=256, max_model_len=128)
    for prompt, got in zip(prompts, engine_tokens(llm, prompts, 8)):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, 8))


def test_chunked_prefill_equals_unchunked():
    model = tiny_model("qwen3")
    prompts = random_prompts((70, 33, 8), seed=1)
    whole = engine_tokens(LLM(model, num_kv_slots=512, max_model_len=128, chunk_prefill_size=128), prompts, 10)
    chunked = engine_tokens(LLM(model, num_kv_slots=512, max_model_len=128, chunk_prefill_size=7,
                                max_num_batched_tokens=9), prompts, 10)
    assert chunked == whole


def test_request_joining_midway_equals_alone():
    model = tiny_model("llama")
    first, late = random_prompts((40, 27), seed=2)
    alone = [engine_tokens(LLM(model, num_kv_slots=512, max_model_len=128), [p], 15)[0] for p in (first, late)]
    llm = LLM(model, num_kv_slots=512, max_model_len=128, chunk_prefill_size=8)
    llm.add_request("a", first, greedy_params(15))
    outs = {}
    for _ in range(9):                       # a is prefilled and decoding when b arrives
        for o in llm.step():
            outs[o.request_id] = o
    assert outs["a"].token_ids and not outs["a"].finished
    llm.add_request("b", late, greedy_params(15))
    while llm.has_unfinished_requests():
        for o in llm.step():
            outs[o.request_id] = o
    assert [outs["a"].token_ids, outs["b"].token_ids] == alone
    assert isinstance(outs["b"], RequestOutput) and outs["b"].finish_reason == "length"
    assert outs["b"].metrics["ttft_s"] is not None


def test_preemption_changes_no_greedy_output():
    model = tiny_model("qwen2")
    prompts = random_prompts((30, 25, 35, 20, 28, 33), seed=4)
    roomy = LLM(model, num_kv_slots=1024, max_model_len=128)
    tight = LLM(model, num_kv_slots=100, max_model_len=100, chunk_prefill_size=16)   # six rows cannot all fit
    ref = engine_tokens(roomy, prompts, 20)
    outs = tight.generate(prompts, greedy_params(20))
    assert [o.token_ids for o in outs] == ref
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    tight.pool.check_whole()


def test_weights_from_safetensors_dir_equal_in_memory(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompts = random_prompts((19, 44), seed=5)
    ref = engine_tokens(LLM(model, num_kv_slots=256, max_model_len=128), prompts, 8)
    for sub in ("one", "sharded"):
        llm = LLM(str(tmp_path / sub), num_kv_slots=256, max_model_len=128, device="cpu")   # same device as the CPU model
        assert engine_tokens(llm, prompts, 8) == ref
        for name, p in LLM(model, num_kv_slots=16, max_model_len=16).model.state_dict().items():
            torch.testing.assert_close(llm.model.state_dict()[name], p, rtol=0, atol=0)


def test_engine_from_weights_skips_random_init_and_holds_the_weights(monkeypatch):
    """Built from weights, the engine's layers skip their random init (every parameter is copied in next) and hold
    exactly the HF model's weights; built from a config (random weights) they still initialise."""
    model = tiny_model("llama")
    inits = []
    real = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda *a, **k: inits.append(1) or real(*a, **k))
    llm = LLM(model, num_kv_slots=64, max_model_len=32)
    assert inits == []
    hf = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    engine = llm.model.state_dict()
    torch.testing.assert_close(engine["embed_tokens.weight"], hf["embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(engine["layers.0.mlp.down_proj.weight"], hf["layers.0.mlp.down_proj.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(engine["layers.2.self_attn.qkv_proj.weight"],
                               torch.cat([hf[f"layers.2.self_attn.{p}_proj.weight"] for p in "qkv"]), rtol=0, atol=0)
    LLM(model.config, num_kv_slots=64, max_model_len=32, device="cpu")
    assert inits, "an engine with random weights no longer initialises its linears"


def test_eos_stops_and_stats():
    model = tiny_model("llama")
    prompt = random_prompts((12,), seed=6)[0]
    first = hf_greedy(model, prompt, 1)[0]
    model.generation_config.eos_token_id = first             # the first greedy token is EOS
    llm = LLM(model, num_kv_slots=64, max_model_len=64)
    out = llm.generate([prompt], sparse_hf.SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    stats = llm.stats()
    assert stats["running"] == 0 and stats["kv_free_slots"] == 64


def test_abort_reports_and_frees():
    model = tiny_model("llama")
    llm = LLM(model, num_kv_slots=128, max_model_len=128)
    llm.add_request("x", random_prompts((20,))[0], greedy_params(50))
    llm.step()
    llm.step()
    assert llm.stats()["kv_free_slots"] < 128
    llm.abort("x")
    outs = llm.step()
    assert [(o.request_id, o.finish_reason, o.finished) for o in outs] == [("x", "abort", True)]
    assert not llm.has_unfinished_requests()
    llm.pool.check_whole()


def test_context_manager_releases():
    with LLM(tiny_model("llama"), num_kv_slots=32, max_model_len=32) as llm:
        assert llm.generate([[1, 2, 3]], greedy_params(2))[0].token_ids
    assert not hasattr(llm, "pool")


def test_in_memory_model_keeps_its_dtype():
    """An in-memory model runs in its own dtype unless ``dtype`` is given (an fp32 model given on CUDA used to run
    in bf16 silently: its KV pool and weights were rounded, so it no longer matched HF ``generate``)."""
    model = tiny_model("llama", layers=1)
    assert LLM(model, max_model_len=64, num_kv_slots=128).dtype == torch.float32
    half = LLM(tiny_model("llama", layers=1).to(torch.bfloat16), max_model_len=64, num_kv_slots=128)
    assert half.dtype == torch.bfloat16 and half.pool.k[0].dtype == torch.bfloat16
    forced = LLM(model, max_model_len=64, num_kv_slots=128, dtype=torch.bfloat16)
    assert forced.dtype == torch.bfloat16 and next(forced.model.parameters()).dtype == torch.bfloat16


def test_bad_input_errors():
    model = tiny_model("llama")
    llm = LLM(model, num_kv_slots=32, max_model_len=128)
    with pytest.raises(ValueError, match="num_kv_slots"):
        llm.add_request("long", list(range(1, 40)), greedy_params(2))
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model, num_kv_slots=512, max_model_len=16).add_request("l", list(range(1, 20)), greedy_params(2))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.add_request("t", "hello", greedy_params(2))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("dup", [1, 2], greedy_params(2))
        llm.add_request("dup", [1, 2], greedy_params(2))
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request("v", [1, 100000], greedy_params(2))
    with pytest.raises(ValueError, match="unknown sparse-hf method"):
        LLM(model, num_kv_slots=32, sparse_method="nope")
    with pytest.raises(ValueError, match="unknown sparse-hf knob"):
        LLM(model, num_kv_slots=32, sparse_method="snapkv", num_top_tokenz=3)
    with pytest.raises(ValueError, match="without sparse_method"):
        LLM(model, num_kv_slots=32, num_top_tokens=3)
    with pytest.raises(ValueError, match="deltakv' needs a compressor"):
        LLM(model, num_kv_slots=32, sparse_method="deltakv")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(model, num_kv_slots=32, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(model, gpu_memory_utilization=1.5)


def test_reexported_from_package():
    assert sparse_hf.LLM is LLM


def test_text_prompts_and_seeded_sampling_independent_of_batch():
    """Text in, text out (tokenizer), and a seeded sampled request draws the same tokens alone or in a batch."""
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=1)
    model.resize_token_embeddings(len(tok))
    llm = LLM(model.eval(), tok, num_kv_slots=512, max_model_len=128)
    seeded = sparse_hf.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    alone = llm.generate(["The sky is"], seeded)[0]
    batch = llm.generate(["Hello world!", "The sky is", "def add(a, b):"],
                         [sparse_hf.SamplingParams(temperature=1.0, max_tokens=5), seeded,
                          sparse_hf.SamplingParams(temperature=0.0, max_tokens=3)])
    assert batch[1].token_ids == alone.token_ids and len(alone.token_ids) == 8
    assert alone.text == tok.decode(alone.token_ids, skip_special_tokens=True)
    assert alone.prompt_token_ids == tok("The sky is")["input_ids"]
    llm.pool.check_whole()


def test_no_starvation_under_a_stream_of_arrivals():
    """A decoding request keeps getting decode steps (prefill and decode alternate) while new requests arrive at
    every step, and the arrivals are served in order."""
    model = tiny_model("llama", layers=1)
    llm = LLM(model, num_kv_slots=4096, max_model_len=64, max_num_seqs=64, chunk_prefill_size=8,
              max_num_batched_tokens=8)
    llm.add_request("first", random_prompts((10,))[0], greedy_params(20))
    finished_at, steps = {}, 0
    while "first" not in finished_at or len(finished_at) < 5:
        if steps < 60:
            llm.add_request(f"new{steps}", random_prompts((12,), seed=steps)[0], greedy_params(2))
        steps += 1
        for o in llm.step():
            if o.finished:
                finished_at[o.request_id] = steps
    assert finished_at["first"] <= 2 * 20 + 4
    order = [rid for rid in sorted(finished_at, key=finished_at.get) if rid.startswith("new")]
    assert order[:3] == ["new0", "new1", "new2"]


@pytest.mark.skipif(not sparse_hf.kernels.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_layer_kernels_equal_torch_path(arch, monkeypatch):
    """The engine's fused RMSNorm / RoPE(+q/k norm, + K/V store) / silu*mul kernels and the skinny GEMM
    (interpreted on CPU) give the torch path's greedy tokens, through prefill chunks and decode steps."""
    import sparse_hf.engine.model as engine_model

    model = tiny_model(arch)
    prompts = random_prompts((13, 6), seed=4)
    llm = LLM(model, num_kv_slots=128, max_model_len=64, chunk_prefill_size=8)
    torch_path = engine_tokens(llm, prompts, 4)
    monkeypatch.setattr(engine_model, "OPS_BACKEND", "triton")
    monkeypatch.setattr(engine_model, "SKINNY_GEMM", True)              # linears of <= 16 rows: the Triton GEMM
    fused = engine_tokens(LLM(model, num_kv_slots=128, max_model_len=64, chunk_prefill_size=8), prompts, 4)
    assert fused == torch_path
