"""``sparse-hf bench`` on CPU with a tiny random shape: well-formed JSON, ratios against vanilla, a plot."""

import json

import pytest

from sparse_hf.bench import budget_config, parse_cases, run_bench
from sparse_hf.cli import main


def test_bench_tiny_cpu(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    results = run_bench("tiny", ["vanilla", "streamingllm", "snapkv", "pyramidkv", "omnikv", "deltakv"], [0.25],
                        [(96, 2)], steps=3, device="cpu", output=str(out), plot=str(png), log=lambda _: None)
    data = json.loads(out.read_text())
    assert data["env"]["device"] == "cpu" and len(data["results"]) == 6
    assert png.stat().st_size > 1000
    for r in results:
        assert "error" not in r, r
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "decode_step_ms", "itl_ms", "kv_bytes"):
            assert r[key] > 0, (r["method"], key)
        if r["method"] != "vanilla":
            assert r["decode_x_vanilla"] > 0
    by = {r["method"]: r for r in results}
    assert by["snapkv"]["kv_ratio"] < 0.5 and by["streamingllm"]["kv_ratio"] < 0.5   # evicted
    assert by["omnikv"]["kv_ratio"] >= 1.0                                           # logical masking keeps all


def test_budget_config_keeps_the_fraction():
    for method in ("snapkv", "pyramidkv", "omnikv", "knorm", "h2o", "deltakv"):
        knobs = budget_config(method, 0.1, 4096)
        assert knobs["num_sink_tokens"] + knobs["num_recent_tokens"] + knobs["num_top_tokens"] == 409
    s = budget_config("streamingllm", 0.25, 1000)
    assert s["num_sink_tokens"] + s["num_recent_tokens"] == 250


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "tiny", "--methods", "nope"], "unknown method 'nope'"),
    (["bench", "--model", "tiny", "--budgets", "abc"], "expected fractions"),
    (["bench", "--model", "tiny", "--budgets", "1.5"], "must be a fraction"),
    (["bench", "--model", "tiny", "--cases", "4096"], "LENGTHxBATCH"),
    (["bench", "--model", "tiny", "--device", "cpu", "--methods", "snapkv+graph"], "needs CUDA"),
])
def test_bench_bad_input(argv, message, capsys):
    """One line on stderr and status 2 (argparse's own errors exit 2 through SystemExit)."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


def test_parse_cases():
    assert parse_cases("4096x8,131072x1") == [(4096, 8), (131072, 1)]


@pytest.mark.parametrize("method", ["vanilla", "hf-best", "snapkv", "deltakv"])
def test_run_case_warms_the_timed_prefill_at_its_shape(method, monkeypatch):
    """The timed TTFT is the second prefill of the case: the first runs the same method's prefill path on the same
    ``(batch, length)`` ids into a cache of its own, so first-call costs of that shape stay out of TTFT (run O)."""
    import torch

    from sparse_hf import bench

    model = bench.build_model("tiny", torch.device("cpu"), torch.float32)
    prefills, forwards = [], []
    real = bench._prefill

    def spy(model_, ids, cache, method_, device):
        token, seconds = real(model_, ids, cache, method_, device)
        prefills.append(dict(ids=ids, cache=cache, method=method_, seconds=seconds))
        return token, seconds

    monkeypatch.setattr(bench, "_prefill", spy)
    from sparse_hf.hf.compat import cache_argument

    key = cache_argument(model.forward)
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append((tuple(kw["input_ids"].shape), id(kw[key]))), with_kwargs=True)
    try:
        r = bench.run_case(model, torch.device("cpu"), 96, 2, method, 0.25, 2, None)
    finally:
        hook.remove()
    warm, timed = prefills
    assert warm["ids"] is timed["ids"] and tuple(timed["ids"].shape) == (2, 96)
    assert warm["method"] == timed["method"] == method
    assert type(warm["cache"]) is type(timed["cache"]) and warm["cache"] is not timed["cache"]
    assert r["ttft_s"] == round(timed["seconds"], 4) and r["ttft_first_s"] == round(warm["seconds"], 4)
    # the model's forwards: the warm-up's prompt, the timed prompt, then decode steps into the timed cache only
    assert [shape for shape, _ in forwards] == [(2, 96), (2, 96), (2, 1), (2, 1)]
    assert forwards[0][1] != forwards[1][1] and {c for _, c in forwards[1:]} == {forwards[1][1]}
