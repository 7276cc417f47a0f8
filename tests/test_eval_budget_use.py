"""The equal-budget columns of the eval tables: tokens kept and read per sparse layer and the share of layers that
read everything, measured from the cache of a real generation on a tiny model, against counts derived here from
the knobs; and the per-cell sample counts and 95% intervals of the summary."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_hf  # noqa: F401  (registers the caches)
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.eval import budget_to_cache_config
from sparse_hf.eval.report import summarize, to_markdown
from sparse_hf.eval.runner import generate_with_use
from sparse_hf.eval.stats import mcnemar_exact, mean_interval, paired_comparison, score_interval, wilson_interval
from test_eval_runner import tok  # noqa: F401  (the toy tokenizer fixture)

PROMPT, NEW, LAYERS = 200, 5, 4


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=len(tok))).eval()


def run(model, tok, method, budget, extra=None):
    ids = torch.randint(5, len(tok), (1, PROMPT), generator=torch.Generator().manual_seed(1))
    config = budget_to_cache_config(method, budget, PROMPT, extra)
    _, use = generate_with_use(model, tok, ids, method, config, NEW)
    return config, use


def test_full_reads_everything(model, tok):
    _, use = run(model, tok, "full", 1.0)
    context = PROMPT + NEW - 1                    # the last generated token is never fed back
    assert use == {"kept": context, "read": context, "full_layer_share": 1.0, "context_tokens": context}


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "knorm", "h2o"])
@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_eviction_reads_the_budget(model, tok, method, budget):
    """Prompt eviction keeps int(budget * prompt) tokens per layer (PyramidKV: on average over layers); the
    generated tokens add to it unless the method re-evicts at every step (H2O keeps its prompt budget)."""
    config, use = run(model, tok, method, budget)
    k = int(budget * PROMPT)
    grown = k if method == "h2o" else k + NEW - 1
    assert use["full_layer_share"] == 0.0 and use["context_tokens"] == PROMPT + NEW - 1
    assert use["read"] == use["kept"]
    if method == "pyramidkv":                     # per-layer rounding of the pyramid: within a token per layer
        assert abs(use["kept"] - grown) <= 1
    else:
        assert use["kept"] == grown, (config, use)


def test_streamingllm_reads_sinks_and_a_rolling_window(model, tok):
    config, use = run(model, tok, "streamingllm", 0.25)
    window = config["num_sink_tokens"] + config["num_recent_tokens"]
    assert window == int(0.25 * PROMPT)
    assert window <= use["kept"] == use["read"] <= window + NEW - 1


@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_omnikv_sparse_layers_read_the_budget_and_filter_layers_everything(model, tok, budget):
    config, use = run(model, tok, "omnikv", budget, {"full_attn_layers": [0, 2]})
    assert use["full_layer_share"] == 2 / LAYERS
    assert use["kept"] == PROMPT + NEW - 1                        # masking frees nothing
    assert use["read"] == int(budget * PROMPT)                    # sink + recent + top of the sparse layers


def test_deltakv_reads_raw_slots_plus_the_picked_compressed_tokens(model, tok):
    comp = DeltaKVCompressor.identity_for(model.config)
    config, use = run(model, tok, "deltakv", 0.1, {"full_attn_layers": [0], "compressor": comp})
    assert use["full_layer_share"] == 1 / LAYERS
    assert use["kept"] == PROMPT + NEW - 1                        # raw + compressed: every token, one way or other
    # sparse layers read the raw tokens (sinks, centers, buffer) and num_top_tokens rebuilt ones, fewer than kept
    assert config["num_top_tokens"] < use["read"] < use["kept"]


def test_wilson_and_normal_intervals():
    low, high = wilson_interval(5, 10)            # textbook value for 5/10
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    assert math.isclose(wilson_interval(10, 10)[1], 1.0) and math.isclose(wilson_interval(0, 10)[0], 0.0, abs_tol=1e-12)
    scores = [0.5, 0.25, 1.0, 0.75]
    mean, sd = sum(scores) / 4, math.sqrt(sum((s - 0.625) ** 2 for s in scores) / 3)
    low, high = mean_interval(scores)
    assert math.isclose(low, mean - 1.959964 * sd / 2, abs_tol=1e-6) and math.isclose(high, mean + 1.959964 * sd / 2, abs_tol=1e-6)
    assert score_interval([0, 1, 1])[2] == "wilson" and score_interval([0.5, 1])[2] == "normal"


def test_summary_reports_samples_intervals_and_budget_use():
    records = []
    for i in range(10):
        records.append(dict(method="snapkv", budget=0.25, task="niah_single", length=1024, depth=0.5, id=i,
                            score=float(i < 7), budget_tokens=256, kept_tokens=260 + i, read_tokens=260 + i,
                            full_layer_share=0.0))
    records.append(dict(method="full", budget=1.0, task="niah_single", length=1024, depth=0.5, id=0, score=1.0))
    summary = summarize(records)
    cell = next(r for r in summary["results"] if r["method"] == "snapkv")
    assert cell["num_samples"] == 10 and cell["score"] == 0.7 and cell["interval"] == "wilson"
    assert (cell["ci_low"], cell["ci_high"]) == wilson_interval(7, 10)
    assert cell["kept_tokens"] == 264.5 and cell["budget_tokens"] == 256 and cell["full_layer_share"] == 0.0
    old = next(r for r in summary["overall"] if r["method"] == "full")  # a prediction from before these fields
    assert math.isnan(old["read_tokens"])
    text = to_markdown(summary)
    assert "| snapkv | 0.25 | 10 | 70.0 | 40-89 | 256 | 264 | 264 | 0.00 |" in text
    assert "| full | - | 1 | 100.0 | 21-100 | - | - | - | - |" in text


def test_resume_refuses_predictions_made_with_other_knobs(model, tok, tmp_path):
    """Both scopes must not share an output directory: the second run would reuse the first's predictions."""
    from sparse_hf.eval import run_eval

    grid = dict(tasks="niah_single", methods="snapkv", budgets=[0.5], lengths=[300], depths=[0.5], num_samples=1,
                output_dir=tmp_path, max_new_tokens=2, progress=False)
    run_eval(model, tok, cache_config={"selection_scope": "layer"}, **grid)
    again = run_eval(model, tok, cache_config={"selection_scope": "layer"}, **grid)
    assert again["num_generated"] == 0 and again["num_skipped"] == 1
    with pytest.raises(ValueError, match="another output directory"):
        run_eval(model, tok, cache_config={"selection_scope": "kv_head"}, **grid)


def test_mcnemar_exact_against_the_binomial_distribution():
    # 9 discordant prompts split 8/1: P(X <= 1) for X ~ Bin(9, 1/2) is 10/512, two-sided 20/512
    assert abs(mcnemar_exact(8, 1) - 20 / 512) < 1e-15 and mcnemar_exact(1, 8) == mcnemar_exact(8, 1)
    assert mcnemar_exact(21, 0) == 2 / 2 ** 21                  # accuracy.md's omnikv (17 for 16): p = 9.5e-07
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0   # no evidence either way


def test_paired_comparison_counts_discordant_prompts_as_a_loop_does(tmp_path):
    """``paired_comparison`` against a plain loop, for 0/1 scores (higher better) and NLLs (lower better), ties
    counted for neither side; ``scores_by_id`` reads the records a comparison pairs, filtered by field."""
    import json
    import random

    from sparse_hf.eval.report import scores_by_id

    rng = random.Random(0)
    ids = [f"p{i}" for i in range(40)]
    a = {i: rng.randint(0, 1) for i in ids}
    b = {i: rng.randint(0, 1) for i in ids}
    wins = sum(1 for i in ids if a[i] == 1 and b[i] == 0)
    losses = sum(1 for i in ids if a[i] == 0 and b[i] == 1)
    assert 0 < wins and 0 < losses and paired_comparison(a, b) == (wins, losses, mcnemar_exact(wins, losses))
    nll_a, nll_b = {i: rng.random() for i in ids}, {i: rng.random() for i in ids}
    nll_b[ids[0]] = nll_a[ids[0]]                                            # a tie
    lower = sum(nll_a[i] < nll_b[i] for i in ids)
    higher = sum(nll_a[i] > nll_b[i] for i in ids)
    assert lower + higher == len(ids) - 1
    assert paired_comparison(nll_a, nll_b, ids, lower_is_better=True) == (lower, higher, mcnemar_exact(lower, higher))
    path = tmp_path / "predictions.jsonl"
    records = [{"id": i, "method": m, "budget": 0.25, "length": n, "score": a[i]}
               for i in ids for m in ("omnikv", "deltakv") for n in (2048, 4096)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert scores_by_id(path, method="omnikv", length=4096, budget=0.25) == a
    assert scores_by_id(path, method="omnikv", length=4096, budget=0.1) == {}
    assert scores_by_id(path, method="omnikv", length=None, budget=None) == a


def test_lane_label_names_each_grid_folder_as_the_tables_show_it():
    """The lane folders of ``benchmarks/accuracy_grid.sh`` -> the label their rows carry in the tables and plots:
    fixed lanes, filter-layer set lanes with and without a compressor tag, and folders that add nothing."""
    from sparse_hf.eval.report import lane_label

    assert lane_label("scope_layer") == "layer" and lane_label("scope_kv_head") == "kv_head"
    assert lane_label("omnikv_calibrated") == "calibrated" and lane_label("deltakv_dcal") == "calibrated for deltakv"
    assert lane_label("omnikv_L0_1_2_3_8_17_22") == "layers 0,1,2,3,8,17,22"
    assert lane_label("deltakv_L0_4_9") == "layers 0,4,9"
    assert lane_label("deltakv-balanced-pca_L0_1_2") == "balanced-pca, layers 0,1,2"
    assert lane_label("omnikv-default-pool7") == "default-pool7"   # a tagged lane without a layer set stays apart
    for plain in ("base", "scored", "deltakv", "omnikv", "deltakv_Lx", "omnikv_L", "deltakv_L1_a"):
        assert lane_label(plain) == "", plain
