"""The CUDA-graph decode path's static buffers (padding rows, scratch slot, width buckets) on CPU: the graphs
are replaced by direct calls of the function they would capture, so everything but the capture itself runs."""

from types import SimpleNamespace

import pytest

from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM
from sparse_hf.engine.graphs import DecodeGraphs


class ReplayWithoutCapture(DecodeGraphs):
    def _capture(self, b: int, w: int) -> None:
        self.graphs[(b, w)] = SimpleNamespace(replay=lambda: self._forward(b, w))


@pytest.mark.parametrize("method,knobs", [
    (None, {}),
    ("snapkv", dict(num_sink_tokens=2, num_recent_tokens=8, num_top_tokens=6, window_size=4)),
    ("streamingllm", dict(num_sink_tokens=2, num_recent_tokens=9)),
    ("omnikv", dict(num_sink_tokens=2, num_recent_tokens=6, num_top_tokens=5, full_attn_layers="0,2")),
])
def test_static_decode_path_equals_eager(method, knobs):
    model = tiny_model("qwen2", layers=4)
    prompts = random_prompts((41, 17, 66), seed=2)          # batch 3 runs the bucket-4 path with one padding row
    kw = dict(num_kv_slots=1024, max_model_len=512, max_num_seqs=6, sparse_method=method, **knobs)
    eager = engine_tokens(LLM(model, **kw), prompts, 20)
    llm = LLM(model, **kw)
    llm.runner.graphs = graphs = ReplayWithoutCapture(llm.model, llm.pool, 6, llm.runner.attention)
    assert engine_tokens(llm, prompts, 20) == eager
    assert {b for b, _ in graphs.graphs} >= {4} and {w for _, w in graphs.graphs} == {256}
    llm.pool.check_whole()
    assert graphs.slot_mapping[:, 3:].eq(llm.pool.scratch_slot).all()     # padding rows wrote only the scratch
