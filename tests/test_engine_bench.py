"""The engine benchmark's CPU smoke mode runs end to end and writes its JSON."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_engine  # noqa: E402


def test_bench_engine_small(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--small", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {r["method"] for r in rows} == {"vanilla", "snapkv", "omnikv"} and len(rows) == 6
    for r in rows:
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["step_ms"] > 0
    load = report["load"]
    assert len(load) == 12 and {r["arrival"] for r in load} == {"together", "poisson 2.0/s"}
    assert sum(r["mixed_steps"] for r in load) == 6                 # each load run with and without mixed steps
    for r in load:
        assert r["output_tok_s"] > 0 and r["ttft_s"]["p50"] > 0 and r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0


def test_bench_engine_runs_the_hf_path_in_the_same_process(tmp_path):
    """``--hf-methods``: the same cases through our HF path first (one table, one process), with the engine's budget
    in tokens turned into each prompt's fraction."""
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--small", "--methods", "vanilla", "--hf-methods", "vanilla,snapkv", "--load-arrivals",
                              "together", "--load-mixed", "on", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    hf = report["hf"]
    assert [(r["method"], r["L"], r["B"]) for r in hf] == [(m, L, B) for L, B in ((96, 2), (160, 1))
                                                           for m in ("vanilla", "snapkv")]
    for r in hf:
        assert r["path"] == "hf" and r["decode_tok_s"] > 0 and r["ttft_s"] > 0
        if r["method"] == "snapkv":                       # --small: budget 48 tokens per prompt
            knobs = r["knobs"]
            assert knobs["num_sink_tokens"] + knobs["num_recent_tokens"] + knobs["num_top_tokens"] == 48
    assert [r["method"] for r in report["results"]] == ["vanilla", "vanilla"]


def test_bench_engine_case_beyond_the_models_positions(tmp_path, monkeypatch):
    """A stand-in for the 262144x1 case: a prompt longer than the shape's max_position_embeddings (RoPE table and
    slot tables follow max_model_len), vanilla and snapkv at a fixed budget, one engine per method."""
    monkeypatch.setitem(bench_engine.SHAPES, "tiny", dict(bench_engine.SHAPES["tiny"], max_position_embeddings=64))
    out = tmp_path / "long.json"
    assert bench_engine.main(["--shape", "tiny", "--cases", "150x1", "--methods", "vanilla,snapkv", "--budget", "32",
                              "--new-tokens", "3", "--chunk-prefill-size", "64", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["vanilla", "snapkv"]
    assert all(r["length"] == 150 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert rows[1]["knobs"]["num_top_tokens"] + rows[1]["knobs"].get("num_recent_tokens", 0) <= 150


def test_load_runs_the_same_requests_through_hf_generate(tmp_path):
    """``--load-hf``: the load's requests (the same prompts the engine gets) through HF ``generate`` 8 at a time,
    every request producing its ``NEW`` tokens; and the capacity line (requests of the longest prompt that fit)."""
    arrivals, prompts = bench_engine.load_requests(6, 16, 64, 100, rate=None)
    assert arrivals == [0.0] * 6 and all(16 <= len(p) <= 64 for p in prompts)
    assert bench_engine.load_requests(6, 16, 64, 100, rate=None)[1] == prompts        # same requests every time
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--small", "--methods", "vanilla,snapkv", "--load-hf", "--load-arrivals", "together",
                              "--load-mixed", "on", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    hf = report["load_hf"]
    assert hf["path"] == "hf generate" and hf["num_requests"] == 6 and hf["output_tok_s"] > 0
    assert hf["output_tokens"] == 6 * 4                                                # 6 requests x 4 new tokens
    capacity = {c["method"]: c for c in report["capacity"]}
    slots = capacity["vanilla"]["pool_slots_per_layer"]
    assert capacity["vanilla"]["rows_that_fit"] == slots // (64 + 4)
    assert capacity["snapkv"]["rows_that_fit"] >= capacity["vanilla"]["rows_that_fit"]
    vs = report["load_vs_hf"]                     # both engines' together-arriving runs, over the same 6 requests
    together = {r["method"]: r for r in report["load"] if r["arrival"] == "together"}
    assert [v["method"] for v in vs] == ["vanilla", "snapkv"]
    for v in vs:
        assert v["requests"] == 6 and v["same_requests"] and hf["batches_done"] == hf["batches_total"] == 1
        assert v["engine_output_tok_s"] == together[v["method"]]["output_tok_s"]
        assert v["output_tok_s_x_hf"] == round(v["engine_output_tok_s"] / hf["output_tok_s"], 2)


def test_load_hf_time_cap_stops_between_batches(tmp_path):
    """``--load-hf-max-s``: once the cap (here 0 s) is reached no HF batch starts (the first always runs); the rates
    are over the batches done, and the engine's ratio runs over the same (first) requests."""
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--small", "--methods", "vanilla", "--load-hf", "--load-hf-batch", "2",
                              "--load-hf-max-s", "0", "--load-arrivals", "together", "--load-mixed", "on",
                              "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    hf = report["load_hf"]
    assert (hf["batches_done"], hf["batches_total"], hf["requests_done"]) == (1, 3, 2)
    # wall_s is rounded to the millisecond: on a fast CPU a batch takes ~10 ms, so allow that rounding's share
    rounding = 0.0005 / hf["wall_s"]
    assert hf["output_tokens"] == 2 * 4 and hf["output_tok_s"] == pytest.approx(8 / hf["wall_s"], rel=0.01 + rounding)
    (vs,) = report["load_vs_hf"]
    assert vs["requests"] == 2 and vs["same_requests"] and vs["engine_output_tok_s"] > 0
    assert report["load"][0]["num_requests"] == 6                                  # the full load is still reported


def test_a_run_killed_mid_way_keeps_what_finished(tmp_path, monkeypatch):
    """The ``--output`` JSON is rewritten after every row: an engine that fails after the HF side leaves that side."""
    def broken(*_args, **_kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(bench_engine, "LLM", broken)
    out = tmp_path / "bench.json"
    try:
        bench_engine.main(["--small", "--methods", "vanilla", "--load-hf", "--hf-methods", "vanilla", "--output",
                           str(out)])
    except RuntimeError:
        pass
    report = json.loads(out.read_text())
    assert report["load_hf"]["batches_done"] == 1 and [r["method"] for r in report["hf"]] == ["vanilla", "vanilla"]
    assert report["results"] == []
