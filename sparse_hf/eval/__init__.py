"""Evaluation of sparse KV caches: needle-in-a-haystack, RULER-style and LongBench tasks.

Python API::

    from sparse_hf.eval import run_eval
    summary = run_eval(model, tokenizer, tasks=["niah_single", "ruler_vt"], methods=["full", "snapkv"],
                       budgets=[0.1, 0.25], lengths=[1024, 2048], depths=[0, 0.5, 1], num_samples=5,
                       seed=0, output_dir="out/eval")

Command line: ``sparse-hf eval ...`` (see :mod:`sparse_hf.eval.cli`).
"""

from .grid import SPARSE_METHODS, VALID_METHODS, parse_budgets, parse_depths, parse_lengths, parse_methods
from .metrics import (classification_score, code_sim, count_score, exact_match, qa_f1, retrieval_score, rouge_l,
                      score_sample, substring_match)
from .runner import budget_to_cache_config, run_eval
from .tasks import SYNTHETIC_TASKS, build_samples, parse_tasks

__all__ = [
    "run_eval", "budget_to_cache_config", "build_samples", "parse_tasks", "parse_methods", "parse_budgets",
    "parse_lengths", "parse_depths", "VALID_METHODS", "SPARSE_METHODS", "SYNTHETIC_TASKS", "score_sample",
    "qa_f1", "rouge_l", "classification_score", "retrieval_score", "count_score", "code_sim",
    "substring_match", "exact_match",
]
