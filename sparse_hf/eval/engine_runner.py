"""Engine-backed generation for ``sparse-hf eval --engine``: a grid cell's prompts go through
:class:`sparse_hf.engine.LLM` together (continuous batching) instead of one ``model.generate`` call each.

The eval's budget rule gives each prompt its own knobs (``budget_to_cache_config(method, budget, prompt_len)``:
absolute token counts that depend on the prompt's length), while an engine holds one set of knobs for all its
requests. So the prompts of one (method, budget) are grouped by their knobs (equal prompt lengths give equal knobs;
the rounding of a fraction makes neighbouring lengths share them too), and each group runs through one engine built
from the already-loaded model with exactly those knobs. Every request therefore gets the same knobs as on the HF
path; decoding is greedy with the same stop rule (the model's ``generation_config`` EOS, which ``generate`` uses
too) and the same ``max_new_tokens``, and the text is decoded from the token ids as the HF path decodes it.
"""

from __future__ import annotations

import json
import time
from collections import Counter

#: Prompts one engine runs together at most (a larger knob group is split into batches of this size).
MAX_ENGINE_ROWS = 32   # 32 x 8K tokens: 12 GB of fp32 KV for SmolLM2, so 5 eval processes fit on one GPU


def knob_groups(method: str, budget: float, prompt_lens: list[int], cache_config: dict | None,
                config_for, max_size: int | None = None) -> list[tuple[dict | None, list[int]]]:
    """``[(knobs, indices)]``: the prompts (by index into ``prompt_lens``) that share ``method``'s knobs at
    ``budget``. ``config_for(method, budget, prompt_len, cache_config)`` is the eval's budget rule (``None``
    for ``full``: one group). ``max_size`` splits larger groups (longest prompts first, so a batch holds similar
    lengths), which bounds an engine's pool and lets results be written as each batch ends."""
    groups: dict[str, tuple[dict | None, list[int]]] = {}
    for i, n in enumerate(prompt_lens):
        knobs = config_for(method, budget, n, cache_config)
        key = json.dumps(knobs, sort_keys=True, default=str)
        groups.setdefault(key, (knobs, []))[1].append(i)
    if max_size is None:
        return list(groups.values())
    out = []
    for knobs, indices in groups.values():
        indices = sorted(indices, key=lambda i: -prompt_lens[i])
        out += [(knobs, sorted(indices[j:j + max_size])) for j in range(0, len(indices), max_size)]
    return out


def engine_kwargs(method: str, knobs: dict | None, lengths: list[int], max_new: list[int], device) -> dict:
    """``LLM`` arguments that hold every request of a group at once: a pool of the group's prompt and output
    tokens (twice that for deltakv, whose pool memory is split between its filter layers and its compressed
    layers), ``max_model_len`` the longest request (a prompt of the model's whole context still gets its answer
    tokens, as ``generate`` gives them), and one row per request. Decode runs eagerly: a batch lives for one
    answer (at most a few dozen decode steps), and CUDA graphs would be captured again for every batch and for
    every batch-size bucket it shrinks through, which costs more than they save."""
    need = [n + m + 1 for n, m in zip(lengths, max_new)]
    rows = len(need)
    slots = sum(need) * (2 if method == "deltakv" else 1)
    slots = max(slots, 2 * max(need))
    kwargs = dict(max_model_len=max(need), max_num_seqs=rows, num_kv_slots=slots, enforce_eager=True,
                  sparse_method=None if method == "full" else method, **(knobs or {}))
    if str(device).startswith("cuda"):
        kwargs["max_num_batched_tokens"] = 16384     # fewer, larger prefill steps on the GPU
    return kwargs


def engine_generate(model, tokenizer, method: str, budget: float, prompts: list[list[int]], max_new: list[int],
                    cache_config: dict | None, config_for, on_batch=None):
    """Yield ``(index, prediction, knobs, use, seconds)`` for every prompt of one (method, budget), a knob group
    at a time (``seconds``: the batch's wall time divided by its size, engine construction and close included).
    ``use`` holds the kept tokens and the share of full layers when the engine can tell them
    (:func:`~.budget_use.engine_budget_use`). ``on_batch(stats)``, if given, is called as each batch ends, before
    its records are yielded, with :func:`batch_stats`' dict (where the batch's wall time went)."""
    import torch

    from ..engine import LLM, SamplingParams
    from .budget_use import engine_budget_use

    lengths = [len(p) for p in prompts]
    for knobs, indices in knob_groups(method, budget, lengths, cache_config, config_for, MAX_ENGINE_ROWS):
        start = time.perf_counter()
        group_prompts = [prompts[i] for i in indices]
        group_new = [max_new[i] for i in indices]
        llm = LLM(model, tokenizer, dtype=model.dtype, device=model.device,
                  **engine_kwargs(method, knobs, [len(p) for p in group_prompts], group_new, model.device))
        built = time.perf_counter()
        try:
            params = [SamplingParams(temperature=0.0, max_tokens=m) for m in group_new]
            counter = _StepCounter(llm)
            with torch.inference_mode():
                outputs = llm.generate(group_prompts, params)
            _sync(model.device)
            generated = time.perf_counter()
            layers = llm.model.num_layers
            method_obj = llm.method
        finally:
            llm.close()
        end = time.perf_counter()
        seconds = (end - start) / len(indices)
        if on_batch is not None:
            on_batch(batch_stats([len(p) for p in group_prompts], [len(o.token_ids) for o in outputs],
                                 built - start, generated - built, end - generated, counter.steps))
        for i, out in zip(indices, outputs):
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            context = len(prompts[i]) + len(out.token_ids) - 1       # tokens whose K/V were written
            use = engine_budget_use(method_obj, layers, out.metrics["kept_kv_tokens"], context)
            yield i, text, knobs, use, seconds


class _StepCounter:
    """Counts an engine's steps by kind (``prefill``, ``decode``, ``mixed``, ``layerwise``) as they are planned,
    by wrapping ``llm._run`` (the one call every step goes through); changes nothing the step computes."""

    def __init__(self, llm):
        self.steps: Counter = Counter()
        run = llm._run

        def counted(plan):
            self.steps[type(plan).__name__.replace("Plan", "").lower()] += 1
            return run(plan)

        llm._run = counted


def _sync(device) -> None:
    """Wait for the device's queued work (so the generate time is the device's, not only the launches')."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def batch_stats(prompt_lens: list[int], output_lens: list[int], build_s: float, generate_s: float, close_s: float,
                steps: Counter) -> dict:
    """Where one engine batch's wall time went: engine construction (``build_s``), ``generate`` (``generate_s``,
    with the step counts by kind), ``close`` (``close_s``); plus the batch's prompt and output tokens."""
    return {"prompts": len(prompt_lens), "prompt_tokens": sum(prompt_lens), "min_len": min(prompt_lens),
            "max_len": max(prompt_lens), "output_tokens": sum(output_lens), "build_s": build_s,
            "generate_s": generate_s, "close_s": close_s, "steps": dict(steps)}


def progress_line(label: str, stats: dict, done: int, total: int, elapsed: float) -> str:
    """One timestamped line per finished batch, e.g. ``12:01:02 engine: snapkv @ 0.25: batch of 32 (4120-4126
    tokens) in 9.8 s (build 0.3, generate 9.4 [prefill 3, mixed 5, decode 40], close 0.1), 12.9k prompt tok/s |
    96/630 prompts, 1.52 prompts/s``: progress that shows in a device log while the eval runs."""
    wall = stats["build_s"] + stats["generate_s"] + stats["close_s"]
    steps = ", ".join(f"{k} {v}" for k, v in sorted(stats["steps"].items()))
    return (f"{time.strftime('%H:%M:%S')} engine: {label}: batch of {stats['prompts']} ({stats['min_len']}-"
            f"{stats['max_len']} tokens) in {wall:.1f} s (build {stats['build_s']:.1f}, generate "
            f"{stats['generate_s']:.1f} [{steps}], close {stats['close_s']:.1f}), "
            f"{stats['prompt_tokens'] / max(wall, 1e-9) / 1e3:.1f}k prompt tok/s | {done}/{total} prompts, "
            f"{done / max(elapsed, 1e-9):.2f} prompts/s")
