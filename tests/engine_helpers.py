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


def hf_greedy_with_logits(model, prompt: list[int], new_tokens: int, **kwargs) -> tuple[list[int], torch.Tensor]:
    """:func:`hf_greedy` plus the reference's logits at every step (``[new_tokens, V]`` float32)."""
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([x[0] for x in out.logits]).float()


def assert_greedy_equal(got: list[int], ref: list[int], ref_logits: torch.Tensor, rel_tol: float = 1e-4) -> None:
    """``got == ref``, or the two part where the reference's top two logits tie within rounding.

    Our engine computes the same function as HF with other kernels (fused projections, other reduction orders), so on
    a tiny random model a near-tie can flip the argmax on another CPU or torch build; past such a tie both
    continuations are valid greedy outputs. Anything else (a real gap at the first difference) fails."""
    if got == ref:
        return
    assert len(got) == len(ref), (got, ref)
    i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
    logits = ref_logits[i]
    gap = (logits[ref[i]] - logits[got[i]]).abs().item()
    assert gap <= rel_tol * max(1.0, logits.abs().max().item()), (
        f"first difference at step {i}: ours {got[i]}, reference {ref[i]}, logit gap {gap:.3g} (not a tie); "
        f"ours {got}, reference {ref}")


def engine_tokens(llm, prompts, new_tokens: int) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, greedy_params(new_tokens))]


def run_mixed_requests(llm, rng, requests: int, max_prompt: int = 12, max_burst: int = 6) -> tuple[dict, set]:
    """Drive ``llm`` with ``requests`` short random prompts arriving in bursts of up to ``max_burst - 1`` per
    step, aborting a random running one with probability 0.15 per step. Checks that each request finishes once,
    as ``"abort"`` exactly when it was aborted. Returns ``(finished RequestOutput by id, aborted ids)``."""
    pending = [(f"r{i}", [rng.randrange(1, 128) for _ in range(rng.randrange(1, max_prompt))])
               for i in range(requests)]
    finished, aborted = {}, set()
    while pending or llm.has_unfinished_requests():
        for _ in range(rng.randrange(0, max_burst)):
            if pending:
                rid, prompt = pending.pop()
                llm.add_request(rid, prompt, greedy_params(rng.randrange(1, 8)))
        if llm.requests and rng.random() < 0.15:
            victim = rng.choice(sorted(llm.requests))
            llm.abort(victim)
            aborted.add(victim)
        for out in llm.step():
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
                assert (out.finish_reason == "abort") == (out.request_id in aborted)
    return finished, aborted


def peak_decoding_rows(llm, prompts, new_tokens: int) -> int:
    """Submit ``prompts`` together and run them to the end: the most rows that decoded together in one step."""
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, greedy_params(new_tokens))
    peak = 0
    while llm.has_unfinished_requests():
        llm.step()
        peak = max(peak, sum(not r.in_prefill for r in llm.scheduler.running))
    return peak
