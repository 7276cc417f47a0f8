

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
def test_gpu_killed_worker_raises_within_seconds():
    """NCCL does not notice a dead peer by itself: the watchdog's abort must end the blocked collective."""
    _two_gpus()
    model = tiny_model("llama", layers=2).cuda()
    prompts = random_prompts((30, 12))
    llm = LLM(model, tensor_parallel_size=2, num_kv_slots=4096, max_model_len=4096, enforce_eager=True)
    try:
        victim = llm.driver.processes[0]
        engine_tokens(llm, prompts, 2)
        timer = threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL))
        start = time.monotonic()
        timer.start()
        with pytest.raises(TensorParallelError, match="rank 1"):
            engine_tokens(llm, prompts * 4, 4000)
        timer.join()
        assert time.monotonic() - start < 15
    finally:
        start = time.monotonic()
        llm.close()
        assert time.monotonic() - start < 30
