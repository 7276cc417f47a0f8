"""Needle-in-a-haystack tasks: single key, multi-key with distractors, multi-value.

Each needle is a sentence ``"One of the special magic numbers for <key> is: <7-digit number>."`` hidden in
filler sentences of random common words. The main needle sits at ``depth`` (0 = start of the haystack,
1 = end); distractor needles and extra values sit at random depths. A sample's randomness depends on
``(seed, task, context_length, index)`` but not on the depth, so the depth grid moves one and the same needle
through one and the same haystack.
"""

from __future__ import annotations

from .haystack import fit_units, insert_at, number, sample_rng, sentences, word_key

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")

TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n{context}\n\n{question}")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION_ONE = "What is the special magic number for {key} mentioned in the provided text?"
PREFIX_ONE = " The special magic number for {key} mentioned in the provided text is"
QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"
PREFIX_ALL = " The special magic numbers for {key} mentioned in the provided text are"

NUM_DISTRACTORS = 3  # niah_multikey: other keys with their own numbers
NUM_VALUES = 4  # niah_multivalue: numbers attached to the one queried key
MAX_NEW_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64}


def make_needle_sample(task: str, tokenizer, context_length: int, depth: float, index: int, seed: int) -> dict:
    """One sample of ``task`` (see :data:`NEEDLE_TASKS`) whose prompt has about ``context_length`` tokens."""
    if task not in NEEDLE_TASKS:
        raise ValueError(f"unknown needle task {task!r}; expected one of {NEEDLE_TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: expected a fraction in [0, 1]")
    rng = sample_rng(seed, task, context_length, index)
    used: set[str] = set()
    key = word_key(rng, used)
    values = [number(rng) for _ in range(NUM_VALUES if task == "niah_multivalue" else 1)]
    needles = [(depth, NEEDLE.format(key=key, value=values[0]))]
    if task == "niah_multivalue":
        needles += [(rng.random(), NEEDLE.format(key=key, value=v)) for v in values[1:]]
    if task == "niah_multikey":
        for _ in range(NUM_DISTRACTORS):
            other, value = word_key(rng, used), number(rng)
            while value in values:
                value = number(rng)
            needles.append((rng.random(), NEEDLE.format(key=other, value=value)))
    many = task == "niah_multivalue"
    question = (QUESTION_ALL if many else QUESTION_ONE).format(key=key)
    prefix = (PREFIX_ALL if many else PREFIX_ONE).format(key=key)
    haystack_seed = rng.getrandbits(64)

    def make_units(count: int) -> list[str]:
        return sentences(sample_rng(haystack_seed, "haystack"), count)

    def build(pool: list[str], n: int) -> tuple[str, str]:
        context = " ".join(insert_at(pool[:n], needles))
        return TEMPLATE.format(context=context, question=question), prefix

    n, tokens, pool = fit_units(tokenizer, make_units, build, context_length, 0.1, task)
    prompt, prefix = build(pool, n)
    return {
        "id": f"{task}-L{context_length}-d{depth:g}-{index}",
        "task": task,
        "context_length": context_length,
        "depth": float(depth),
        "prompt": prompt,
        "answer_prefix": prefix,
        "answers": values,
        "metric": "substring_match",
        "max_new_tokens": MAX_NEW_TOKENS[task],
        "chat_template": True,
        "num_tokens": tokens,
    }
