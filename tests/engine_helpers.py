"""Shared pieces of the engine tests: random prompts, HF references, greedy params."""

from __future__ import annotations

import torch

from helpers import VOCAB
from sparse_hf.engine import SamplingParams


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def hf_greedy(model, prompt: list[int], new_tokens: int, **kwargs) -> list[int]:
    """HF ``generate`` greedy continuation of one unpadded prompt (EOS ignored)."""
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, **kwargs)
    return out[0, len(prompt):].tolist()


def engine_tokens(llm, prompts, new_tokens: int) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, greedy_params(new_tokens))]
