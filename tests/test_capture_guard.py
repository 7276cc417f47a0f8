"""The guard around every CUDA-graph capture: garbage is collected before the capture and the cyclic collector
stays off during it (an automatic collection mid-capture freed an older CUDAGraph, whose reset() invalidated the
capture on an H200; see kernels/capture.py)."""

import gc
import weakref

import pytest
import torch

from sparse_hf.kernels.capture import no_collection_during_capture


class Node:
    pass


def _cycle_with_callback(seen):
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a, lambda _: seen.append("collected"))


def test_collects_before_and_keeps_the_collector_off_inside():
    assert gc.isenabled()
    seen = []
    ref = _cycle_with_callback(seen)           # unreachable cycle: only a collection frees it
    with no_collection_during_capture():
        assert seen == ["collected"] and ref() is None, "garbage left for a collection during the capture"
        assert not gc.isenabled()
    assert gc.isenabled()


def test_restores_the_collector_after_an_error_and_keeps_it_off_if_it_was_off():
    with pytest.raises(RuntimeError):
        with no_collection_during_capture():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection_during_capture():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decoder_captures_while_dead_graphs_wait_for_collection():
    """Unreachable cycles that hold captured CUDA graphs, and a collector set to run at every allocation: the
    HF path's graph decoder still captures (without the guard, a collection during the capture resets an old
    graph and invalidates the capture)."""
    from helpers import decode_greedy, tiny_model
    from sparse_hf import build_cache, prepare_model

    model = tiny_model("llama", layers=2).to("cuda")
    prepare_model(model)
    ids = torch.randint(3, 100, (2, 24), device="cuda")
    knobs = dict(num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=6, window_size=4, cuda_graph=False)

    def decoder():
        cache = build_cache("snapkv", model.config, knobs)
        with torch.inference_mode():
            token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return decode_greedy(model, cache, token, 24, 4, graph=True)[1]

    for _ in range(3):                          # leave captured graphs in unreachable cycles
        dead = decoder()
        assert dead.captures >= 1
        dead.cycle = dead
        del dead
    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        live = decoder()
    finally:
        gc.set_threshold(*old)
    assert live.captures >= 1 and not live.disabled
