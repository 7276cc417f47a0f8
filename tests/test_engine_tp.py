"""Tensor parallelism on CPU (gloo, two processes): TP=2 greedy output equals TP=1 for full attention and every
engine method, the pool is whole on every rank, bad head counts fail clearly, a dead rank raises within seconds,
and the same engine runs under ``torchrun``."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine_helpers import (assert_greedy_equal, engine_tokens, hf_greedy_with_logits, random_prompts,
                            run_mixed_requests)
from helpers import tiny_model
from sparse_hf.engine import LLM
from sparse_hf.engine.tp import TensorParallelError
from test_engine_methods import KNOBS

LENGTHS = (20, 50, 77)
ENGINE = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)


def assert_same_greedy(tp2, tp1, model, prompts, new_tokens, **hf_kwargs):
    """TP=2 tokens equal TP=1 tokens. The all-reduce sums the row-parallel matmuls in another order, so a
    near-tie could flip an argmax on another machine; only then do we accept both as valid greedy outputs by the
    HF reference's logits (a real gap fails)."""
    for prompt, a, b in zip(prompts, tp2, tp1):
        if a != b:
            ref, logits = hf_greedy_with_logits(model, prompt, new_tokens, **hf_kwargs)
            assert_greedy_equal(a, ref, logits)
            assert_greedy_equal(b, ref, logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tp2_equals_tp1_full_attention(arch):
    model = tiny_model(arch, layers=2)
    prompts = random_prompts(LENGTHS)
    tp1 = engine_tokens(LLM(model, **ENGINE), prompts, 12)
    with LLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert llm.tensor_parallel_size == 2 and llm.model.num_heads == 2 and llm.pool.num_kv_heads == 1
        tp2 = engine_tokens(llm, prompts, 12)
        llm.check_pool_whole()
    assert_same_greedy(tp2, tp1, model, prompts, 12)


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_tp2_equals_tp1_every_method(method):
    """Eviction methods select per KV head (a KV head and its query group sit on one rank); OmniKV all-reduces
    (max) its per-token scores before the top-k. Either way TP=2 picks what TP=1 picks."""
    model = tiny_model("llama", layers=4)
    prompts = random_prompts(LENGTHS)
    vanilla = engine_tokens(LLM(model, **ENGINE), prompts, 30)
    tp1 = engine_tokens(LLM(model, sparse_method=method, **ENGINE, **KNOBS[method]), prompts, 30)
    assert tp1 != vanilla, "knobs too loose: the method changed nothing, so the test would prove nothing"
    with LLM(model, tensor_parallel_size=2, sparse_method=method, **ENGINE, **KNOBS[method]) as llm:
        tp2 = engine_tokens(llm, prompts, 30)
        llm.check_pool_whole()
    assert_same_greedy(tp2, tp1, model, prompts, 30, cache_implementation=method, cache_config=KNOBS[method])


def mixed_outputs(llm) -> dict:
    """:func:`run_mixed_requests` in a small pool: finished tokens, reason and preemptions by request id."""
    finished, _ = run_mixed_requests(llm, random.Random(0), 40, max_prompt=14, max_burst=5)
    return {rid: (o.token_ids, o.finish_reason, o.metrics["num_preemptions"]) for rid, o in finished.items()}


def test_tp2_pool_whole_after_aborts_and_preemption():
    """Rows freed on rank 0 (finished, aborted, preempted) are freed on rank 1 too: same outputs as TP=1, and
    every rank's pool is whole afterwards."""
    model = tiny_model("llama", layers=2)
    knobs = dict(num_sink_tokens=1, num_recent_tokens=4, num_top_tokens=2, window_size=2)
    engine = dict(num_kv_slots=40, max_model_len=32, max_num_seqs=6, chunk_prefill_size=4, max_num_batched_tokens=8,
                  sparse_method="snapkv", **knobs)
    tp1 = mixed_outputs(LLM(model, **engine))
    with LLM(model, tensor_parallel_size=2, **engine) as llm:
        tp2 = mixed_outputs(llm)
        llm.check_pool_whole()
    assert tp2 == tp1
    assert any(p for _, _, p in tp1.values()) and any(r == "abort" for _, r, _ in tp1.values())


def test_head_counts_must_divide():
    model = tiny_model("llama", layers=1)                  # 4 query heads, 2 KV heads, MLP width 128
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        LLM(model, tensor_parallel_size=4, **ENGINE)
    with pytest.raises(ValueError, match="num_attention_heads=4, num_key_value_heads=2"):
        LLM(model, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        LLM(model, tensor_parallel_size=0, **ENGINE)


def test_bad_knobs_under_tp_fail_before_spawning():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="num_top_tokens"):
        LLM(model, tensor_parallel_size=2, sparse_method="snapkv", num_top_tokens=-3, **ENGINE)
    with pytest.raises(ValueError, match="tp_selection='any'.*'exact'.*'per_rank'"):
        LLM(model, tensor_parallel_size=2, tp_selection="any", sparse_method="omnikv", **ENGINE, **KNOBS["omnikv"])


def test_killed_worker_raises_within_seconds():
    """A worker killed between steps: the next call raises at once. A worker killed in the middle of a
    generate: the generate raises within seconds (no hang). Closing afterwards is quick too."""
    model = tiny_model("llama", layers=2)
    prompts = random_prompts((30, 12))
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    try:
        assert len(engine_tokens(llm, prompts, 4)) == 2
        os.kill(llm.driver.processes[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1"):
            while True:                                    # the watchdog needs a moment to see the exit
                engine_tokens(llm, prompts, 4)
                assert time.monotonic() - start < 10, "a dead rank went unnoticed for 10 s"
        assert time.monotonic() - start < 10
        with pytest.raises(TensorParallelError):          # and the engine stays failed
            engine_tokens(llm, prompts, 4)
    finally:
        start = time.monotonic()
        llm.close()
        assert time.monotonic() - start < 15

    assert_kill_mid_generate_raises(LLM(model, tensor_parallel_size=2, num_kv_slots=1024, max_model_len=1024),
                                    prompts, 900)


def assert_kill_mid_generate_raises(llm, prompts, new_tokens: int, close_s: float = 15) -> None:
    """Kill rank 1 one second into a ``generate`` of ``new_tokens`` (far longer than that): the generate raises
    :class:`TensorParallelError` naming the rank within seconds, and ``close()`` is quick. Closes ``llm``."""
    try:
        victim = llm.driver.processes[0]
        engine_tokens(llm, prompts, 2)
        timer = threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL))
        start = time.monotonic()
        timer.start()
        with pytest.raises(TensorParallelError, match="rank 1"):
            engine_tokens(llm, prompts * 4, new_tokens)
        timer.join()
        assert time.monotonic() - start < 15
    finally:
        start = time.monotonic()
        llm.close()
        assert time.monotonic() - start < close_s


TORCHRUN_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
from engine_helpers import engine_tokens, random_prompts
from helpers import tiny_model
from sparse_hf.engine import LLM

model = tiny_model("llama", layers=4)                # the same seed on every rank: the same weights
prompts = random_prompts((20, 50, 77))
knobs = dict(num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=8, full_attn_layers=[0, 2])
engine = dict(num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16, sparse_method="omnikv", **knobs)
if os.environ["RANK"] == "0":
    ref = engine_tokens(LLM(model, **engine), prompts, 20)
llm = LLM(model, tensor_parallel_size=2, **engine)   # rank 1 serves rank 0 inside this call, then exits
got = engine_tokens(llm, prompts, 20)
llm.check_pool_whole()
llm.close()
print("RESULT " + json.dumps({{"equal": got == ref, "tp": llm.tensor_parallel_size}}))
"""


def test_torchrun_launch(tmp_path):
    """``torchrun --nproc-per-node 2`` runs the same script on both ranks (env:// rendezvous): rank 0 gets the
    engine, rank 1 serves it, and the output equals TP=1."""
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from sparse_hf.engine.tp import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout                    # code after LLM(...) runs on rank 0 only
    result = json.loads(lines[0][len("RESULT "):])
    assert result == {"equal": True, "tp": 2}


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_serve_with_tensor_parallel_size(launcher, tmp_path):
    """``sparse-hf serve --tensor-parallel-size 2`` (the engine's spawn, or every rank under torchrun) answers
    what a TP=1 engine generates, and Ctrl-C stops every rank."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from sparse_hf.engine import SamplingParams
    from tiny_tokenizer import free_port, save_tiny_chat_model, wait_for_health

    model_dir = save_tiny_chat_model(tmp_path / "model", seed=3)
    port = free_port()
    serve = ["-m", "sparse_hf.engine.serve_cli", model_dir, "--port", str(port), "--max-model-len", "128",
             "--num-kv-slots", "512", "--max-num-seqs", "4", "--served-model-name", "tiny", "--log-level", "warning",
             "--tensor-parallel-size", "2"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port())] + serve
    else:
        cmd = [sys.executable] + serve
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(trust_env=False, timeout=60) as http:
            wait_for_health(http, url, proc)
            body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            text = http.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
        expected = LLM(model_dir, max_model_len=128, num_kv_slots=512).generate(
            "Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
        assert text == expected
    finally:
        os.killpg(proc.pid, signal.SIGINT)                    # Ctrl-C: the whole process group
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    err = proc.stderr.read()
    assert "tensor-parallel rank" not in err, err[-3000:]          # no rank failed on the way down
    if launcher == "spawn":                                  # torchrun itself exits 1 after a signal
        assert proc.returncode in (0, -signal.SIGINT, 130), err[-3000:]
    time.sleep(1.0)
    left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    alive = [line for line in left.splitlines() if line.strip() and "<defunct>" not in line]
    assert not alive, left                                   # and no rank outlives it (zombies await a reaper)


def test_torchrun_size_must_match(monkeypatch):
    """Under torchrun the engine spans the whole launch: another size fails at once instead of waiting for
    ranks that will never come."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="launched by torchrun with 1 ranks but tensor_parallel_size=2"):
        LLM(tiny_model("llama", layers=1), tensor_parallel_size=2, **ENGINE)


# ---------------------------------------------------------------- two GPUs (NCCL); skipped on CPU

def _two_gpus():
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("method", [None, "snapkv", "omnikv"])
def test_gpu_tp2_equals_tp1(method, enforce_eager):
    """NCCL all-reduces, in CUDA graphs unless ``enforce_eager``; fp32 so that only rounding order differs."""
    _two_gpus()
    import torch

    model = tiny_model("llama", layers=4).cuda()
    prompts = random_prompts(LENGTHS)
    knobs = {} if method is None else KNOBS[method]
    engine = dict(ENGINE, dtype=torch.float32, enforce_eager=enforce_eager, sparse_method=method, **knobs)
    tp1 = engine_tokens(LLM(model, **engine), prompts, 30)
    with LLM(model, tensor_parallel_size=2, **engine) as llm:
        assert llm.device == torch.device("cuda", 0) and llm.model.num_kv_heads == 1
        tp2 = engine_tokens(llm, prompts, 30)
        llm.check_pool_whole()
        if not enforce_eager:
            assert llm.runner.graphs.graphs, "no CUDA graph was captured"
    hf = {} if method is None else dict(cache_implementation=method, cache_config=knobs)
    assert_same_greedy(tp2, tp1, model, prompts, 30, **hf)


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(set(KNOBS) - {"snapkv", "omnikv"}) + ["deltakv"])
def test_gpu_tp2_equals_tp1_other_methods(method):
    """Issue 15's "every method": the methods the test above leaves out (streamingllm, pyramidkv, knorm, h2o and
    DeltaKV, whose flush all-gathers the ranks' heads) under NCCL with CUDA graphs, fp32."""
    _two_gpus()
    import torch

    from test_engine_deltakv import KNOBS as DELTAKV_KNOBS, compressor

    model = tiny_model("llama", layers=4).cuda()
    prompts = random_prompts(LENGTHS)
    knobs, hf_knobs = KNOBS.get(method), KNOBS.get(method)
    if method == "deltakv":      # the engine moves its compressor to the device; the HF reference needs one there
        comp = compressor(model)
        knobs = dict(DELTAKV_KNOBS, num_top_tokens=6, compressor=comp)
        hf_knobs = dict(knobs, compressor=copy.deepcopy(comp).cuda())
    engine = dict(ENGINE, dtype=torch.float32, sparse_method=method, **knobs)
    tp1 = engine_tokens(LLM(model, **engine), prompts, 30)
    with LLM(model, tensor_parallel_size=2, **engine) as llm:
        tp2 = engine_tokens(llm, prompts, 30)
        llm.check_pool_whole()
    assert_same_greedy(tp2, tp1, model, prompts, 30, cache_implementation=method, cache_config=hf_knobs)


@pytest.mark.gpu
def test_gpu_killed_worker_raises_within_seconds():
    """NCCL does not notice a dead peer by itself: the watchdog's abort must end the blocked collective."""
    _two_gpus()
    model = tiny_model("llama", layers=2).cuda()
    prompts = random_prompts((30, 12))
    llm = LLM(model, tensor_parallel_size=2, num_kv_slots=4096, max_model_len=4096, enforce_eager=True)
    assert_kill_mid_generate_raises(llm, prompts, 4000, close_s=30)
