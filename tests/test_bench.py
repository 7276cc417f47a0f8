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
