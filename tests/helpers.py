"""Tiny random models and inputs shared by the tests."""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

ARCHS = ("llama", "qwen2", "qwen3")
VOCAB = 128


def tiny_model(arch: str = "llama", layers: int = 3, seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """A random decoder of the given family: hidden 64, GQA (4 query heads, 2 KV heads), fp32, eval mode."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=1024, head_dim=16)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        common.pop("head_dim")
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    return model.eval()


def left_padded_batch(lengths=(48, 37), seed: int = 1):
    """Random prompts of different lengths, left-padded with id 0: ``input_ids``, ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, total - n:] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens=10, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          **kwargs)


def assert_same_generation(ours, ref, atol: float, rtol: float) -> None:
    """Two ``generate(..., output_logits=True, return_dict_in_generate=True)`` outputs: equal tokens, close logits."""
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
