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


#: Tensor methods that wait for the device on CUDA (they read a value back to the host).
DEVICE_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")


def spy_device_reads(monkeypatch, obj, name: str, before=None) -> list:
    """Wrap ``obj.name`` so that every :data:`DEVICE_READS` call made while it runs is recorded (in the returned
    list); ``before(*args)`` runs first at each call. ``monkeypatch.undo()`` restores everything."""
    inner, calls, inside = getattr(obj, name), [], []

    def watched(*args, **kwargs):
        if before is not None:
            before(*args)
        inside.append(True)
        try:
            return inner(*args, **kwargs)
        finally:
            inside.pop()
    monkeypatch.setattr(obj, name, watched)
    for method in DEVICE_READS:
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _name=method, _original=original, **kwargs):
            if inside:
                calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, spy)
    return calls


def decode_greedy(model, cache, token, start: int, steps: int, graph: bool):
    """``steps`` greedy decode steps after a prompt of ``start`` tokens whose last logits gave ``token`` (``[B, 1]``):
    model calls, or replays of a :class:`sparse_hf.GraphDecoder` (``graph``). Returns ``([B, steps]`` tokens, the
    decoder or ``None``)."""
    from sparse_hf.hf.cuda_graph import GraphDecoder

    decoder = GraphDecoder(model, cache) if graph else None
    tokens = []
    for i in range(steps):
        pos = torch.full_like(token, start + i)
        with torch.inference_mode():
            logits = decoder.step(token, pos) if graph else model(
                input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True).clone()
        tokens.append(token)
    return torch.cat(tokens, 1), decoder


def saved_tiny_llama(folder, layers: int):
    """A tiny random Llama with the toy tokenizer, saved to ``folder`` as a model folder the CLI can load:
    ``(folder, model)``."""
    from sparse_hf.eval.toy import build_toy_tokenizer

    torch.manual_seed(0)
    tok = build_toy_tokenizer()
    config = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok))
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model
