"""Mixed steps (prompt chunks and decode rows in one step) change no greedy output (CPU fp32), keep the token budget,
and leave the pool whole."""

import pytest

from engine_helpers import greedy_params, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM

KNOBS = {
    None: {},
    "snapkv": dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, window_size=8),
    "streamingllm": dict(num_sink_tokens=4, num_recent_tokens=12),
    "omnikv": dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, full_attn_layers=[0, 2]),
}


def staggered_run(llm, prompts, arrive_at, new_tokens):
    """Add prompt ``i`` before step ``arrive_at[i]``; run to the end. Returns (token ids per prompt, step kinds)."""
    kinds = []
    schedule = llm.scheduler.schedule

    def recording_schedule():
        kind, batch = schedule()
        kinds.append(kind)
        return kind, batch

    llm.scheduler.schedule = recording_schedule
    outs, step = {}, 0
    while len(outs) < len(prompts):
        for i, at in enumerate(arrive_at):
            if at == step:
                llm.add_request(f"r{i}", prompts[i], greedy_params(new_tokens))
        for o in llm.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
        step += 1
    return [outs[f"r{i}"] for i in range(len(prompts))], kinds


@pytest.mark.parametrize("method", list(KNOBS), ids=lambda m: m or "vanilla")
def test_mixed_steps_equal_separate_steps(method):
    """Requests arrive while others decode; with mixed steps each decode row keeps its tokens (and the
    methods' evictions stay the same), and prompts complete inside mixed steps."""
    model = tiny_model("llama", layers=4)
    prompts = random_prompts((37, 21, 50, 9), seed=5)
    arrive_at = (0, 3, 5, 12)
    runs = {}
    for mixed in (False, True):
        llm = LLM(model, num_kv_slots=1024, max_model_len=128, chunk_prefill_size=8, max_num_batched_tokens=10,
                  sparse_method=method, mixed_steps=mixed, **KNOBS[method])
        runs[mixed] = staggered_run(llm, prompts, arrive_at, 12)
        llm.pool.check_whole()
    (separate, kinds_separate), (mixed, kinds_mixed) = runs[False], runs[True]
    assert "mixed" not in kinds_separate and kinds_mixed.count("mixed") >= 5
    assert "decode" in kinds_mixed                       # decode-only steps stay decode steps (CUDA graphs)
    assert mixed == separate
    assert len(kinds_mixed) < len(kinds_separate)        # fewer steps: decode rows ride along with the chunks


def test_mixed_step_budget_and_slots():
    """A mixed step carries every decoding row plus chunks within max_num_batched_tokens and the free slots."""
    model = tiny_model("llama", layers=1)
    llm = LLM(model, num_kv_slots=256, max_model_len=128, chunk_prefill_size=8, max_num_batched_tokens=10,
              max_num_seqs=8)
    prompts = random_prompts((3, 4, 5, 40, 30), seed=6)
    for i, p in enumerate(prompts[:3]):
        llm.add_request(f"short{i}", p, greedy_params(30))
    while llm.scheduler.waiting or any(r.in_prefill for r in llm.scheduler.running):
        llm.step()                                       # the three short prompts prefilled, now decoding
    for i, p in enumerate(prompts[3:]):
        llm.add_request(f"long{i}", p, greedy_params(2))
    seen = 0
    while llm.scheduler.waiting or any(r.in_prefill for r in llm.scheduler.running):
        kind, batch = llm.scheduler.schedule()
        if kind == "mixed":
            chunks, decoding = batch
            assert len(decoding) >= 3 and sum(n for _, n in chunks) + len(decoding) <= 10
            assert all(not r.in_prefill for r in decoding) and all(r.in_prefill for r, _ in chunks)
            seen += 1
        _run_scheduled(llm, kind, batch)
    assert seen >= 8                                      # 70 prompt tokens, at most 7 per mixed step
    while llm.has_unfinished_requests():
        llm.step()
    llm.pool.check_whole()


def _run_scheduled(llm, kind, batch):
    """Run an already scheduled step (as ``LLM.step`` would after ``schedule``)."""
    schedule = llm.scheduler.schedule
    llm.scheduler.schedule = lambda: (kind, batch)
    try:
        llm.step()
    finally:
        llm.scheduler.schedule = schedule


def test_mixed_steps_knob_validated():
    with pytest.raises(ValueError, match="mixed_steps"):
        LLM(tiny_model("llama", layers=1), num_kv_slots=32, max_model_len=32, mixed_steps="yes")
