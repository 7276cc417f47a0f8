"""The engine benchmark's CPU smoke mode runs end to end and writes its JSON."""

import json
import sys
from pathlib import Path

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
    assert len(load) == 6 and {r["arrival"] for r in load} == {"together", "poisson 2.0/s"}
    for r in load:
        assert r["output_tok_s"] > 0 and r["ttft_s"]["p50"] > 0 and r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0
