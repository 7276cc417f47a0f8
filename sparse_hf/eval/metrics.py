"""Scoring functions, each returning a float in [0, 1], and :func:`score_sample` dispatching on a sample.

The LongBench metrics follow its ``metrics.py`` (SQuAD-normalised token F1, classification, retrieval, count,
code edit similarity) and its ``eval.py`` (the best score over the reference answers; first line only for the
few-shot tasks). ROUGE-L is implemented here as a token-level LCS F1 on lower-cased word tokens; it is close
to, but not bit-identical with, the ``rouge`` package LongBench uses. Synthetic tasks (needles, RULER) score
the fraction of expected answers found in the output, case-insensitively, like RULER's ``string_match_all``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from difflib import SequenceMatcher

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squeeze whitespace (SQuAD / LongBench)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    """Harmonic mean of token precision and recall with multiset overlap."""
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    """Normalised token F1 between prediction and one reference answer."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1: LCS of lower-cased word tokens over the prediction (precision) and reference (recall)."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, all_classes=None, **_) -> float:
    """1 / (number of matched class names) if the right class is among the class names in the prediction.

    Class names that are strict substrings of the reference do not count as extra matches (LongBench).
    """
    matches = [c for c in (all_classes or []) if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the paragraph number ``N`` of ``"Paragraph N"``."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference, **_) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def first_code_line(prediction: str) -> str:
    """The first line that is not a comment or a markdown fence (contains none of ``` ` ``, ``#``, ``//``)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def edit_similarity(a: str, b: str) -> float:
    """``2 * matches / (len(a) + len(b))`` from difflib's matching blocks (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def code_sim(prediction: str, reference: str, **_) -> float:
    """Edit similarity between the first code line of the prediction and the reference line."""
    return edit_similarity(first_code_line(prediction), reference)


def substring_match(prediction: str, answers, **_) -> float:
    """Fraction of ``answers`` (a list, or one string) found in the prediction, case-insensitively."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(str(a).lower() in pred for a in answers) / len(answers)


def exact_match(prediction: str, reference: str, **_) -> float:
    """1.0 when the normalised prediction equals the normalised reference."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


#: Metrics scored against each reference separately (the sample's score is the best one).
PER_REFERENCE = {"qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification_score,
                 "retrieval": retrieval_score, "count": count_score, "code_sim": code_sim,
                 "exact_match": exact_match}
#: Metrics scored against the whole answer list at once.
WHOLE_LIST = {"substring_match": substring_match}
METRIC_NAMES = tuple(PER_REFERENCE) + tuple(WHOLE_LIST)


def score_sample(prediction: str, sample: dict) -> float:
    """Score ``prediction`` for ``sample`` with ``sample["metric"]`` (see :data:`METRIC_NAMES`)."""
    metric = sample["metric"]
    if sample.get("first_line_only"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric in WHOLE_LIST:
        return float(WHOLE_LIST[metric](prediction, sample["answers"]))
    if metric not in PER_REFERENCE:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")
    fn = PER_REFERENCE[metric]
    return max((float(fn(prediction, ref, all_classes=sample.get("all_classes"))) for ref in sample["answers"]),
               default=0.0)
