"""RULER-style synthetic tasks: variable tracking, common/frequent word extraction, multi-hop key chains.

The tasks follow the designs of RULER (Hsieh et al., 2024) with our own wording and the shipped word list:

* ``ruler_vt`` - chains ``VAR A = 12345. ... VAR B = VAR A. ...`` hidden in filler text; report every
  variable holding the queried value (a distractor chain holds another value).
* ``ruler_cwe`` - a numbered word list where 10 words appear far more often than the others; report them.
* ``ruler_fwe`` - words drawn with Zipf frequencies (alpha 2); report the three most frequent.
* ``ruler_multihop`` - ``The key a leads to the key b.`` statements at random places; follow the chain
  from the start key to the number at its end (a distractor chain ends at another number).

The score is the fraction of expected answers found in the output (``substring_match``).
"""

from __future__ import annotations

import math
import re

from .haystack import (count_tokens, distinct_numbers, fit_units, insert_at, letter_name, sample_rng, sentences,
                       word_key)
from .words import WORDS

RULER_TASKS = ("ruler_vt", "ruler_cwe", "ruler_fwe", "ruler_multihop")
MAX_NEW_TOKENS = {"ruler_vt": 64, "ruler_cwe": 128, "ruler_fwe": 64, "ruler_multihop": 32}

VT_TEMPLATE = ("Memorize and track the chains of variable assignment hidden in the following text.\n\n{context}\n\n"
               "Question: Find all variables that are assigned the value {value} in the text above.")
VT_PREFIX = (" Answer: According to the chains of variable assignment in the text above, {count} variables are "
             "assigned the value {value}, they are:")
VT_HOPS, VT_CHAINS = 4, 2

CWE_TEMPLATE = ("Below is a numbered list of words. Some of them appear more often than others. Memorize the ones "
                "that appear most often.\n\n{context}\n\nQuestion: What are the 10 most common words in the list "
                "above?")
CWE_PREFIX = " Answer: The 10 words that appear most often in the list are:"
CWE_COMMON = 10

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appearing coded words.\n\n{context}\n\nQuestion: Do not provide any explanation. What "
                "are the three most frequently appearing words in the coded text above?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appearing words are:"
FWE_ALPHA = 2.0

MH_TEMPLATE = ("Some keys hidden in the following text lead to other keys, and some lead to numbers. Memorize "
               "them.\n\n{context}\n\nQuestion: Start at the key {start} and follow the keys in the text above. "
               "Which number do you reach at the end?")
MH_PREFIX = " Answer: Following the keys from {start}, the number reached at the end is"
MH_HOP = "The key {a} leads to the key {b}."
MH_END = "The key {a} leads to the number {value}."
MH_HOPS, MH_CHAINS = 3, 2


def _template_words(*templates: str) -> set[str]:
    return {w.lower() for t in templates for w in re.findall(r"[A-Za-z]+", t)}


def _sample(task, length, index, prompt, prefix, answers, tokens) -> dict:
    return {"id": f"{task}-L{length}-{index}", "task": task, "context_length": length, "depth": None,
            "prompt": prompt, "answer_prefix": prefix, "answers": answers, "metric": "substring_match",
            "max_new_tokens": MAX_NEW_TOKENS[task], "chat_template": True, "num_tokens": tokens}


def _chain_task(task, tokenizer, length, index, seed, statements, template_fields, template, prefix):
    """Shared body of vt / multihop: hide ``(fraction, statement)`` pairs in filler sentences and fit."""
    rng = sample_rng(seed, task, length, index, "haystack")
    haystack_seed = rng.getrandbits(64)

    def make_units(count):
        return sentences(sample_rng(haystack_seed), count)

    def build(pool, n):
        context = " ".join(insert_at(pool[:n], statements))
        return template.format(context=context, **template_fields), prefix

    n, tokens, pool = fit_units(tokenizer, make_units, build, length, 0.1, task)
    return build(pool, n), tokens


def make_vt(tokenizer, length: int, index: int, seed: int) -> dict:
    rng = sample_rng(seed, "ruler_vt", length, index)
    used: set[str] = set()
    values = distinct_numbers(rng, VT_CHAINS, 5)
    statements, chains = [], []
    for value in values:
        names = [letter_name(rng, used) for _ in range(VT_HOPS + 1)]
        chains.append(names)
        fracs = sorted(rng.random() for _ in names)  # a chain is told in order
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        statements += list(zip(fracs, lines))
    statements.sort(key=lambda s: s[0])
    prefix = VT_PREFIX.format(count=VT_HOPS + 1, value=values[0])
    (prompt, prefix), tokens = _chain_task("ruler_vt", tokenizer, length, index, seed, statements,
                                           {"value": values[0]}, VT_TEMPLATE, prefix)
    return _sample("ruler_vt", length, index, prompt, prefix, chains[0], tokens)


def make_multihop(tokenizer, length: int, index: int, seed: int) -> dict:
    rng = sample_rng(seed, "ruler_multihop", length, index)
    used: set[str] = set()
    values = distinct_numbers(rng, MH_CHAINS, 6)
    statements, starts = [], []
    for value in values:
        keys = [word_key(rng, used) for _ in range(MH_HOPS)]
        starts.append(keys[0])
        lines = [MH_HOP.format(a=a, b=b) for a, b in zip(keys, keys[1:])] + [MH_END.format(a=keys[-1], value=value)]
        statements += [(rng.random(), line) for line in lines]  # random order: the model must hop
    statements.sort(key=lambda s: s[0])
    prefix = MH_PREFIX.format(start=starts[0])
    (prompt, prefix), tokens = _chain_task("ruler_multihop", tokenizer, length, index, seed, statements,
                                           {"start": starts[0]}, MH_TEMPLATE, prefix)
    return _sample("ruler_multihop", length, index, prompt, prefix, [values[0]], tokens)


def make_cwe(tokenizer, length: int, index: int, seed: int) -> dict:
    """Common words: 10 words repeated ``f_cw`` times, every other word at most ``ceil(n / V)`` times."""
    rng = sample_rng(seed, "ruler_cwe", length, index)
    vocab = [w for w in WORDS if w not in _template_words(CWE_TEMPLATE, CWE_PREFIX)]
    rng.shuffle(vocab)
    common, uncommon = vocab[:CWE_COMMON], vocab[CWE_COMMON:]
    probe = " ".join(f"{i + 1}. {w}" for i, w in enumerate(vocab[:100]))
    est_entries = max(1, int(length / (count_tokens(tokenizer, probe) / 100)))
    f_cw = max(2, math.ceil(0.25 * est_entries / CWE_COMMON))
    order_seed = rng.getrandbits(64)

    def make_units(count):
        pool_rng, pool = sample_rng(order_seed, "pool"), []
        while len(pool) < count:
            cycle = list(uncommon)
            pool_rng.shuffle(cycle)
            pool += cycle
        return pool[:count]

    def build(pool, n):
        entries = common * f_cw + pool[:n]
        sample_rng(order_seed, "order", n).shuffle(entries)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return CWE_TEMPLATE.format(context=context), CWE_PREFIX

    n, tokens, pool = fit_units(tokenizer, make_units, build, length, 1.0 / 3, "ruler_cwe")
    if n and math.ceil(n / len(uncommon)) >= f_cw:
        raise ValueError(f"ruler_cwe: context length {length} too large for the shipped word list")
    prompt, prefix = build(pool, n)
    return _sample("ruler_cwe", length, index, prompt, prefix, list(common), tokens)


def zipf_counts(n: int, vocab_size: int, alpha: float = FWE_ALPHA) -> list[int]:
    """Occurrences of ranks 1..vocab_size for about ``n`` words drawn with Zipf weights ``1 / k**alpha``."""
    weights = [1.0 / (k**alpha) for k in range(1, vocab_size + 1)]
    total = sum(weights)
    return [int(n * w / total + 0.5) for w in weights]


def make_fwe(tokenizer, length: int, index: int, seed: int) -> dict:
    """Frequent words: exact Zipf counts (not sampled), so the top three are well defined."""
    rng = sample_rng(seed, "ruler_fwe", length, index)
    vocab = [w for w in WORDS if w not in _template_words(FWE_TEMPLATE, FWE_PREFIX)]
    rng.shuffle(vocab)
    order_seed = rng.getrandbits(64)

    def build(_pool, n):
        words = [w for w, c in zip(vocab, zipf_counts(n, len(vocab))) for _ in range(c)]
        sample_rng(order_seed, n).shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX

    n, tokens, pool = fit_units(tokenizer, lambda c: [None] * c, build, length, 1.0, "ruler_fwe")
    counts = zipf_counts(n, len(vocab))
    if counts[2] <= counts[3]:
        raise ValueError(f"ruler_fwe: context length {length} is too small to rank the three most frequent words")
    prompt, prefix = build(pool, n)
    return _sample("ruler_fwe", length, index, prompt, prefix, vocab[:3], tokens)


MAKERS = {"ruler_vt": make_vt, "ruler_cwe": make_cwe, "ruler_fwe": make_fwe, "ruler_multihop": make_multihop}


def make_ruler_sample(task: str, tokenizer, context_length: int, index: int, seed: int) -> dict:
    """One sample of a RULER-style ``task`` (see :data:`RULER_TASKS`) of about ``context_length`` tokens."""
    if task not in MAKERS:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {RULER_TASKS}")
    return MAKERS[task](tokenizer, context_length, index, seed)
