"""The engine computes full attention in every layer, so a model with sliding-window layers is refused unless no
sequence can exceed its window (``max_model_len <= sliding_window``); it used to run them as full attention and give
other tokens than HF (found by the differential fuzzer, ``fuzz_differential.py``)."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
    Qwen3ForCausalLM

from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy, hf_greedy_with_logits, random_prompts
from sparse_hf.engine import LLM

WINDOW = 16
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=128, max_position_embeddings=256, sliding_window=WINDOW)
MODELS = {
    "qwen2": lambda sliding: Qwen2ForCausalLM(Qwen2Config(use_sliding_window=sliding, max_window_layers=0, **COMMON)),
    "qwen3": lambda sliding: Qwen3ForCausalLM(Qwen3Config(use_sliding_window=sliding, max_window_layers=0,
                                                          head_dim=16, **COMMON)),
    "mistral": lambda sliding: MistralForCausalLM(MistralConfig(head_dim=16, **dict(
        COMMON, sliding_window=WINDOW if sliding else None))),
}


def sliding_model(arch, sliding=True):
    """The tiny random model of ``arch`` with a sliding window of ``WINDOW`` in every layer (``sliding=False``: the
    same weights, full attention)."""
    torch.manual_seed(0)
    model = MODELS[arch](sliding).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_window_shorter_than_max_model_len_is_refused(arch):
    model = sliding_model(arch)
    prompt = random_prompts((40,), seed=1)[0]
    with pytest.raises(NotImplementedError, match=f"sliding_window={WINDOW}.*max_model_len <= {WINDOW}"):
        LLM(model, num_kv_slots=256, max_model_len=64)
    # the refusal is not over-cautious: past the window, HF's tokens are not full attention's (the engine's)
    full = sliding_model(arch, sliding=False)
    assert hf_greedy(model, prompt, 6) != hf_greedy(full, prompt, 6)
    assert engine_tokens(LLM(full, num_kv_slots=256, max_model_len=64), [prompt], 6)[0] == hf_greedy(full, prompt, 6)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_window_covering_every_sequence_runs_and_equals_hf(arch):
    model = sliding_model(arch)
    prompts = random_prompts((9, 12), seed=2)
    llm = LLM(model, num_kv_slots=256, max_model_len=WINDOW)
    for prompt, got in zip(prompts, engine_tokens(llm, prompts, WINDOW - len(prompts[1]))):
        assert_greedy_equal(got, *hf_greedy_with_logits(model, prompt, len(got)))
