"""The engine's DeltaKV decode step: what its fused layout relies on, and the profiler's graph lookup.

- The picks read the observation scores at ``S + offset`` (no gather through ``comp_pos``): every compressed
  offset ``j`` of an engine row must sit at position ``S + j`` in every compressed layer.
- ``profile_engine.gpu_step_ms`` replays the latest captured graph of ``DecodeGraphs`` (a dict per bucket) and of
  ``DeltaKVGraphs`` (only its latest ``graph``); it crashed on the latter.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.engine import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_engine  # noqa: E402


def test_compressed_offsets_sit_at_consecutive_positions():
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    llm = LLM(model, sparse_method="deltakv", compressor=comp, full_attn_layers=[0, 2], num_sink_tokens=3,
              num_recent_tokens=4, num_top_tokens=5, cluster_ratio=0.25, num_kv_slots=1024, max_model_len=256,
              chunk_prefill_size=16)
    seen = []
    flush = llm.runner.flush

    def checked_flush(rows):
        flush(rows)
        store = llm.pool.store
        for row in rows:
            for layer in store.layers:
                if store.count(row):
                    pos = store.state(row, layer).comp_pos[0]
                    assert torch.equal(pos.long(), 3 + torch.arange(store.count(row))), (row, layer, pos)
                    seen.append(store.count(row))

    llm.runner.flush = checked_flush
    engine_tokens(llm, random_prompts((40, 23, 61), seed=2), 12)
    assert len(set(seen)) > 2                         # several flushes (the prompts' and during decode) checked


def test_latest_graph_of_both_graph_kinds():
    assert profile_engine.latest_graph(None) is None
    assert profile_engine.latest_graph(SimpleNamespace(graphs={})) is None
    assert profile_engine.latest_graph(SimpleNamespace(graphs={1: "g1", 4: "g4"})) == "g4"
    assert profile_engine.latest_graph(SimpleNamespace(graph=None)) is None          # DeltaKVGraphs before capture
    assert profile_engine.latest_graph(SimpleNamespace(graph="g")) == "g"


def test_bench_engine_deltakv_small_reports_the_memory_bounds(capsys):
    import json

    import bench_engine_deltakv

    assert bench_engine_deltakv.main(["--small", "--kv-quant-bits", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    vanilla = [r for r in rows if r["method"] == "vanilla"]
    deltakv = [r for r in rows if r["method"] == "deltakv"]
    assert vanilla and deltakv and deltakv[0]["knobs"]["kv_quant_bits"] == 4
    assert vanilla[0]["longest_prompt_b1"] == vanilla[0]["group_slots"][0]
    # the same memory (num_kv_slots): the prompt held raw in every layer until it ends bounds deltakv below vanilla
    assert 0.5 * vanilla[0]["longest_prompt_b1"] < deltakv[0]["longest_prompt_b1"] < vanilla[0]["longest_prompt_b1"]


def test_bench_engine_deltakv_longest_prompt_takes_the_filter_layers(capsys):
    """``--full-attn-layers`` reaches the layout: 4 raw layers leave 24 of the 7B shape's 28 compressed (7 by
    default leave 21), and fewer raw layers hold a longer prompt in the same memory."""
    import json

    import bench_engine_deltakv

    def reports(*extra):
        assert bench_engine_deltakv.main(["--longest-prompt", *extra]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    default, four = reports(), reports("--full-attn-layers", "0,3,15,21")
    assert {r["compressed_layers"] for r in default} == {21} and {r["compressed_layers"] for r in four} == {24}
    for d, f in zip(default, four):
        assert (d["kv_quant_bits"], d["offload_latents"]) == (f["kv_quant_bits"], f["offload_latents"])
        assert f["longest_prompt_b1_layerwise"] > d["longest_prompt_b1_layerwise"]
