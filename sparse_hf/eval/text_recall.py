"""``text_recall``: recall from a real text, not a planted needle.

The context is a run of consecutive paragraphs of a local prose corpus (by default the held-out novel that
``examples/prepare_corpus.py`` writes: Jane Austen's *Persuasion*, offline). The answer prefix quotes the first
:data:`CUE_WORDS` words of one sentence of it and the question asks to continue the quotation, and the answer is the next :data:`ANSWER_WORDS` words of that
sentence. Nothing marks the sentence: the model must find a phrase of ordinary
text by its wording and copy what follows, which small models can do at a few thousand tokens (it is induction,
not reasoning), while a cache that dropped the sentence cannot. The quoted phrase occurs exactly once in the
context, and the answer words are plain words (no punctuation inside the answer), so ``substring_match`` scores it.

A sample depends only on ``(seed, task, length, index)`` and the corpus file: where the context starts in the
corpus and at which depth (uniform in [0.05, 0.95]) the quoted sentence lies.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .haystack import fit_units, sample_rng

TEXT_TASKS = ("text_recall",)
DEFAULT_CORPUS = "~/.cache/sparse_hf/data/austen/heldout.jsonl"
CUE_WORDS, ANSWER_WORDS = 8, 3
MAX_NEW_TOKENS = 16

# The question does not repeat the quoted words: if it did, copying would continue from the question's copy.
TEMPLATE = ("Read the following text carefully.\n\n{context}\n\nQuestion: Continue the quotation below with the "
            "words that follow it in the text above.")
PREFIX = " Answer: \"{cue}"      # the model continues the quotation with the words that follow the cue
_PLAIN_WORD = re.compile(r"^[A-Za-z]+$")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def corpus_path(corpus_file: str | os.PathLike | None) -> Path:
    """The corpus file to read (``None``: :data:`DEFAULT_CORPUS`); a missing file says how to make one."""
    path = Path(os.path.expanduser(str(corpus_file or DEFAULT_CORPUS)))
    if not path.is_file():
        raise FileNotFoundError(
            f"text_recall needs a local text corpus and {path} does not exist: build the default one with "
            "`python examples/prepare_corpus.py` (offline, from a Debian package) or pass a .jsonl file with a "
            "\"text\" field per line, or a .txt file, as --corpus-file (Python: corpus_file=...)")
    return path


def load_paragraphs(corpus_file=None) -> list[str]:
    """The corpus's paragraphs in order (documents split on blank lines; whitespace inside one collapsed)."""
    path = corpus_path(corpus_file)
    text = path.read_text(encoding="utf-8")
    docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else [text]
    paragraphs = [" ".join(p.split()) for doc in docs for p in re.split(r"\n\s*\n", doc)]
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) < 2:
        raise ValueError(f"{path}: too little text for text_recall (fewer than 2 paragraphs)")
    return paragraphs


def _candidates(context: str):
    """``(start offset, cue, answer)`` of every sentence with a plain-word answer after its first cue words."""
    out, offset = [], 0
    for sentence in _SENTENCE_END.split(context):
        start = context.index(sentence, offset)
        offset = start + len(sentence)
        words = sentence.split()
        if len(words) < CUE_WORDS + ANSWER_WORDS:
            continue
        answer = words[CUE_WORDS:CUE_WORDS + ANSWER_WORDS]
        if all(_PLAIN_WORD.match(w) for w in answer):
            out.append((start, " ".join(words[:CUE_WORDS]), " ".join(answer)))
    return out


def make_text_recall_sample(tokenizer, length: int, index: int, seed: int, paragraphs: list[str]) -> dict:
    """One ``text_recall`` sample of about ``length`` tokens from ``paragraphs`` (see the module doc)."""
    task = "text_recall"
    rng = sample_rng(seed, task, length, index)
    first, depth = rng.randrange(len(paragraphs)), rng.uniform(0.05, 0.95)
    placeholder = " ".join(["word"] * CUE_WORDS)

    def make_units(count):
        """Sentences from paragraph ``first`` on, each with the separator that follows it (paragraph breaks kept),
        so the context fills the length to within a sentence."""
        units = []
        for i in range(len(paragraphs)):
            parts = _SENTENCE_END.split(paragraphs[(first + i) % len(paragraphs)])
            units += [(p, " " if j < len(parts) - 1 else "\n\n") for j, p in enumerate(parts)]
            if len(units) >= count:
                break
        return units[:count]

    def join(units):
        return "".join(text + sep for text, sep in units).strip()

    def build(pool, n):
        return TEMPLATE.format(context=join(pool[:n]), cue=placeholder), PREFIX.format(cue=placeholder)

    n, _, pool = fit_units(tokenizer, make_units, build, length, 0.05, task)
    context = join(pool[:n])
    found = [c for c in _candidates(context) if context.count(c[1]) == 1]
    if not found:
        raise ValueError(f"{task}: no sentence of {CUE_WORDS + ANSWER_WORDS}+ words with a unique opening in a "
                         f"{length}-token context of the corpus; use a longer length or another corpus")
    start, cue, answer = min(found, key=lambda c: abs(c[0] - depth * len(context)))
    prompt, prefix = TEMPLATE.format(context=context, cue=cue), PREFIX.format(cue=cue)
    tokens = len(tokenizer(prompt + prefix, add_special_tokens=False)["input_ids"])
    return {"id": f"{task}-L{length}-{index}", "task": task, "context_length": length, "depth": None,
            "prompt": prompt, "answer_prefix": prefix, "answers": [answer], "metric": "substring_match",
            "max_new_tokens": MAX_NEW_TOKENS, "chat_template": True, "num_tokens": tokens,
            "answer_depth": round(start / max(1, len(context)), 3)}
