"""Seeded randomized differential test of the HF path and the engine (CPU, fp32; the pieces are in
``fuzz_differential.py``, whose docstring lists what is drawn and compared).

``SPARSE_HF_FUZZ_CASES`` (default 150: about a minute on one core) cases from seed ``SPARSE_HF_FUZZ_SEED`` (default
0). A failure prints each failing case as JSON; replay one with ``SPARSE_HF_FUZZ_SEED=<seed> SPARSE_HF_FUZZ_CASES=1``
or ``python tests/fuzz_differential.py <seed> 1``. The pools are roomy, so no case preempts (preemption by recompute
has its own tests)."""

import json
import os
from dataclasses import asdict

from fuzz_differential import draw_case, run_cases

CASES = int(os.environ.get("SPARSE_HF_FUZZ_CASES", "150"))
FIRST_SEED = int(os.environ.get("SPARSE_HF_FUZZ_SEED", "0"))


def test_draws_cover_every_method_and_knob_kind():
    """The default cases reach every method, unlimited budgets, late arrivals, sampling, GQA, both scopes, stop ids,
    EOS, aborted decoys, every DeltaKV prefill route and the model config draws."""
    cases = [draw_case(seed) for seed in range(FIRST_SEED, FIRST_SEED + max(CASES, 150))]
    assert {c.method for c in cases} == {None, "streamingllm", "snapkv", "pyramidkv", "knorm", "omnikv", "h2o",
                                         "deltakv"}
    assert any(c.unlimited for c in cases) and any(max(c.arrivals) > 0 for c in cases)
    assert any(s is not None for c in cases for s in c.sample_seeds)
    assert {c.knobs.get("selection_scope") for c in cases} >= {"layer", "kv_head"}
    assert any(c.heads > c.kv_heads for c in cases) and any(c.heads == c.kv_heads for c in cases)
    assert any(isinstance(c.knobs.get("num_top_tokens"), float) for c in cases)
    assert any(isinstance(c.knobs.get("num_top_tokens"), int) for c in cases)
    assert any(not c.engine["mixed_steps"] for c in cases) and any(c.engine["max_num_seqs"] == 1 for c in cases)
    assert any(c.stop_ids[i] for c in cases for i in range(len(c.stop_ids)))
    assert any(not flag for c in cases for flag in c.ignore_eos)
    assert any(d["abort_after"] is not None for c in cases for d in c.decoys)
    assert {c.engine.get("deltakv_prefill") for c in cases} >= {"chunked", "layerwise", "auto"}
    assert any(c.model_extra.get("rope_scaling") for c in cases) and any(c.model_extra["tie_word_embeddings"]
                                                                       for c in cases)


def test_differential_fuzz():
    failing = run_cases(FIRST_SEED, CASES)
    report = "\n".join(json.dumps({"case": asdict(case), "failures": failures}, default=str)
                       for case, failures in failing)
    assert not failing, f"{len(failing)} of {CASES} fuzz cases failed (replay: python tests/fuzz_differential.py " \
                        f"<seed> 1):\n{report}"
