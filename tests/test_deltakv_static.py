"""DeltaKV decode with static shapes (HF path): the same tokens and logits as the concatenating path, no host sync
and no new buffers in a decode step, and the steps that must run eagerly (flushes, scratch re-sizes) predicted
before they run. ``-m gpu``: CUDA-graph decode gives eager decode's tokens (fp32 and bf16)."""

import pytest
import torch

import sparse_hf
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.hf.deltakv_cache import CompressedCache
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from helpers import greedy, left_padded_batch, tiny_model

KNOBS = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
             deltakv_neighbor_count=2)


def _config(model, budget, bits=0, latent=16):
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=latent)
    return dict(KNOBS, compressor=comp, num_top_tokens=budget, kv_quant_bits=bits)


def _generate(model, ids, mask, cfg, static, monkeypatch, new=24):
    monkeypatch.setattr(CompressedCache, "static_decode", static)
    return greedy(model, ids, mask, new_tokens=new, cache_implementation="deltakv", cache_config=cfg,
                  output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("arch,budget,bits", [("llama", 6, 0), ("qwen3", 6, 8), ("qwen2", 0.25, 4),
                                              ("llama", 100, 0)])
def test_static_decode_matches_the_concatenating_path(arch, budget, bits, monkeypatch):
    # left padding, flushes during decode, a fraction budget (per-row budgets), a budget above every count
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((50, 31))
    cfg = _config(model, budget, bits)
    old = _generate(model, ids, mask, cfg, False, monkeypatch)
    new = _generate(model, ids, mask, cfg, True, monkeypatch)
    layers = [layer for layer in new.past_key_values.layers if isinstance(layer, DeltaKVLayer)]
    assert all(layer.static_ok and layer.scratch > 0 for layer in layers)
    assert not any(layer.static_ok for layer in old.past_key_values.layers if isinstance(layer, DeltaKVLayer))
    assert torch.equal(old.sequences, new.sequences)
    for a, b in zip(old.logits, new.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _decoder(arch="llama", budget=0.25, prompt=40, layers=4, padded=False):
    """A model and a DeltaKV cache after the prompt and one generated token, and ``step()`` (one decode step)."""
    model = tiny_model(arch, layers=layers)
    ids = torch.randint(1, 100, (2, prompt), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        ids, mask = left_padded_batch((prompt, prompt - 13))
    out = greedy(model, ids, mask, new_tokens=2, cache_implementation="deltakv",
                 cache_config=_config(model, budget), return_dict_in_generate=True)
    cache = out.past_key_values
    pad = (mask == 0).sum(-1, keepdim=True)                     # a row's positions start after its padding
    state = dict(tok=out.sequences[:, -1:], pos=out.sequences.shape[1] - 1 - pad)

    def step():
        with torch.inference_mode():
            logits = model(input_ids=state["tok"], position_ids=state["pos"],
                           past_key_values=cache, use_cache=True).logits[:, -1]
        state["tok"], state["pos"] = logits.argmax(-1, keepdim=True), state["pos"] + 1
        return logits

    return model, cache, step


class _SyncCounter:
    """Counts host reads of device values (``item``, ``tolist``, ``bool()``/``int()``/``float()`` of a tensor,
    ``numpy``) made while the cache's attention runs, by patching ``torch.Tensor`` (no CUDA needed)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch, cache):
        self.calls = []
        self.active = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        attend = cache.attend

        def counted_attend(*args, **kwargs):
            self.active = True
            try:
                return attend(*args, **kwargs)
            finally:
                self.active = False

        monkeypatch.setattr(cache, "attend", counted_attend)

    def _wrap(self, name, original):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(t, *args, **kwargs)
        return wrapper


def _buffers(cache):
    out = []
    for layer in cache.layers:
        if isinstance(layer, DeltaKVLayer):
            s = layer.state
            out += [layer._k, layer._v, layer._pos, layer._raw_pos, s.center_x, s.fathers, s.latent.codes,
                    s.comp_pos, layer.width_dev]
    return [t.data_ptr() for t in out]


def test_a_static_decode_step_reads_no_device_value_and_keeps_its_buffers(monkeypatch):
    model, cache, step = _decoder()
    counter = _SyncCounter(monkeypatch, cache)
    checked = 0
    flushed = 0
    for _ in range(12):
        reason = cache.eager_step_reason()
        before = _buffers(cache)
        counts = list(cache.layers[-1].state.counts)
        if reason is None:                 # a step a CUDA graph would replay: the captured part, then maintain_layer
            cache.capturing = True
            step()
            cache.capturing = False
            assert counter.calls == [], counter.calls
            assert _buffers(cache) == before
            checked += 1
            for i in range(len(cache.layers)):
                cache.maintain_layer(i)    # a flush step's flush (host reads allowed: it runs between replays)
            flushed += counts != cache.layers[-1].state.counts
        else:
            step()
        counter.calls.clear()
    assert checked >= 8 and flushed >= 2
    # the instrumentation does see the cache's host reads: a padded prompt's end reads each row's padding, once for
    # all compressed layers (an unpadded prompt reads nothing: test_deltakv_prompt_end.py)
    fresh = sparse_hf.build_cache("deltakv", model.config, _config(model, 0.25))
    prompt = _SyncCounter(monkeypatch, fresh)
    ids, mask = left_padded_batch((40, 27))
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, past_key_values=fresh, use_cache=True)
    assert prompt.calls == ["tolist"]


def test_eager_steps_are_predicted_before_they_run(monkeypatch):
    # every step that re-sizes the scratch slots at its start is announced by eager_step_reason, and no other; a
    # flush step is not (it replays; its flush runs after it), and its flush sizes the scratch up to the next flush,
    # so re-sizes at a step's start are (nearly) gone
    _, cache, step = _decoder(budget=0.25)
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    events = []
    in_flush = []
    original_flush, original_set = CompressedCache._flush, DeltaKVLayer.set_scratch

    def flush(self, *args):
        in_flush.append(1)
        try:
            return original_flush(self, *args)
        finally:
            in_flush.pop()

    def set_scratch(self, width):
        if width != self.scratch:
            events.append("flush resize" if in_flush else "start resize")
        return original_set(self, width)

    monkeypatch.setattr(CompressedCache, "_flush", flush)
    monkeypatch.setattr(DeltaKVLayer, "set_scratch", set_scratch)
    flushes = start_resizes = flush_resizes = 0
    for _ in range(40):
        reason = cache.eager_step_reason()
        counts = [list(layer.state.counts) for layer in layers]
        events.clear()
        step()
        flushes += counts != [list(layer.state.counts) for layer in layers]
        start_resizes += "start resize" in events
        flush_resizes += "flush resize" in events
        if "start resize" in events:
            assert reason is not None
        else:
            assert reason is None, reason
    assert flushes >= 8 and flush_resizes >= 1 and start_resizes <= 1


def test_scratch_slots_follow_the_budget_and_are_counted_once():
    _, cache, step = _decoder(budget=0.25)
    for _ in range(6):
        step()
    usage = sparse_hf.kv_usage(cache)
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    shared = layers[0].shared
    key = "shared scratch (raw copy + rebuilt tokens of a decode step; one for all layers)"
    for layer in layers:
        n, top = layer.state.width, int(0.25 * layer.seen)
        assert min(n, top) <= layer.scratch <= n
        assert layer.shared is shared                                     # one work buffer for every layer
        k_s, v_s, cols_s = layer.scratch_views()
        assert k_s.shape[2] == layer.scratch and k_s.data_ptr() != layer._k.data_ptr()
        assert shared.k.shape[2] >= layer.capacity + layer.scratch
        assert layer.bytes_by_part()[key] == (shared.nbytes() if layer is layers[0] else 0)
    assert shared.nbytes() == sum(t.numel() * t.element_size() for t in (shared.k, shared.v, shared.pos))
    assert usage.bytes == sum(layer.allocated_bytes() for layer in cache.layers)
    # the raw slots of a compressed layer stop at the sinks and two recent buffers (a flush leaves one)
    assert all(layer.capacity <= KNOBS["num_sink_tokens"] + 2 * KNOBS["num_recent_tokens"] for layer in layers)


def test_sharing_the_scratch_changes_no_token_and_saves_its_bytes(monkeypatch):
    # the same static decode with a scratch of each layer's own (a SharedScratch per layer): the same tokens and
    # logits up to rounding (the raw room differs, so the attention pass is of another length), fewer bytes shared
    from sparse_hf.hf import deltakv_layer

    model = tiny_model("qwen2", layers=5)
    ids, mask = left_padded_batch((50, 31))
    cfg = _config(model, 0.25, bits=4)
    shared = _generate(model, ids, mask, cfg, True, monkeypatch, new=30)
    monkeypatch.setattr(CompressedCache, "make_layer", lambda self, i: sparse_hf.hf.cache.SlotLayer()
                        if i in self.method.full_layers else deltakv_layer.DeltaKVLayer())
    own = _generate(model, ids, mask, cfg, True, monkeypatch, new=30)
    assert torch.equal(shared.sequences, own.sequences)
    for a, b in zip(shared.logits, own.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    compressed = sum(isinstance(layer, DeltaKVLayer) for layer in own.past_key_values.layers)
    saved = sparse_hf.kv_usage(own.past_key_values).bytes - sparse_hf.kv_usage(shared.past_key_values).bytes
    one = own.past_key_values.layers[-1].shared.nbytes()
    assert compressed == 3 and saved >= (compressed - 1) * one * 0.9


@pytest.mark.parametrize("budget", [6, 0.25])
def test_the_compressed_layers_share_one_pick_per_step(budget, monkeypatch):
    # every compressed layer holds the same tokens at the same columns (left padding, flushes during decode), so a
    # static step picks once (one top-k over the filter scores), not once per layer
    from sparse_hf.methods.deltakv import DeltaKV

    calls = []
    original = DeltaKV.pick_static
    monkeypatch.setattr(DeltaKV, "pick_static", lambda self, *a: calls.append(1) or original(self, *a))
    _, cache, step = _decoder(budget=budget, layers=6, padded=True)
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    assert len(layers) == 4
    static_steps = 0
    for _ in range(20):
        calls.clear()
        step()
        for layer in layers[1:]:
            assert torch.equal(layer.compressed_columns(), layers[0].compressed_columns())
            assert layer.state.counts == layers[0].state.counts and layer.scratch == layers[0].scratch
        if all(layer.static_ok for layer in layers):
            assert len(calls) == 1
            static_steps += 1
    assert static_steps >= 15


@pytest.mark.gpu
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen3", torch.float32),
                                        ("llama", torch.bfloat16), ("qwen3", torch.bfloat16)])
@pytest.mark.parametrize("budget", [6, 0.25])
def test_cuda_graph_decode_matches_eager_decode(arch, dtype, budget):
    """Graph decode (the default on CUDA), token for token the same as eager decode; ``generate`` plans the capacity
    (``CompressedCache.plan_generation``), so flushes keep the captured graph (tests/test_deltakv_fixed_capacity.py)."""
    model = tiny_model(arch, layers=4).to("cuda", dtype)
    ids, mask = left_padded_batch((50, 38))
    ids, mask = ids.cuda(), mask.cuda()
    cfg = _config(model, budget)
    cfg["compressor"] = cfg["compressor"].to("cuda", dtype)
    kw = dict(new_tokens=60, cache_implementation="deltakv", return_dict_in_generate=True, output_logits=True)
    eager = greedy(model, ids, mask, cache_config=dict(cfg, cuda_graph=False), **kw)
    graph = greedy(model, ids, mask, cache_config=cfg, **kw)   # cuda_graph unset: graphs by default
    assert getattr(eager.past_key_values, "graph_decoder", None) is None
    assert graph.past_key_values.graph_decoder.captures >= 1
    assert torch.equal(eager.sequences, graph.sequences)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(eager.logits, graph.logits):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_the_triton_rebuild_inside_generate_gives_the_torch_tokens(monkeypatch):
    # the fused kernels (under the Triton interpreter on CPU) in the real decode path, against their torch reference
    from functools import partial

    from sparse_hf.deltakv import state as core
    from sparse_hf.kernels import HAS_TRITON, deltakv_rebuild_kv

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    model = tiny_model("qwen3", layers=4)                       # k_norm in the kernel too
    ids, mask = left_padded_batch((30, 22))
    cfg = _config(model, 4, bits=4)
    torch_run = _generate(model, ids, mask, cfg, True, monkeypatch, new=6)
    monkeypatch.setattr(core, "deltakv_rebuild_kv", partial(deltakv_rebuild_kv, backend="triton"))
    triton_run = _generate(model, ids, mask, cfg, True, monkeypatch, new=6)
    assert torch.equal(torch_run.sequences, triton_run.sequences)
    for a, b in zip(torch_run.logits, triton_run.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not sparse_hf.kernels.HAS_TRITON, reason="needs triton (interpreted on CPU)")
def test_observer_range_scores_equal_the_torch_scores():
    # the GPU path's observer scores (two Triton passes over a per-row slot range, interpreted on CPU) against
    # method.decode_scores, on left-padded rows after a flush; a layer with a hole in its mask keeps the torch path
    from sparse_hf.kernels.dispatch import is_interpreted
    from sparse_hf.kernels.omnikv_scores import _range_softmax_stats_kernel
    if not is_interpreted(_range_softmax_stats_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 before sparse_hf.kernels is imported")
    model, cache, step = _decoder(padded=True)
    step()
    observers = [i for i in range(len(cache.layers)) if cache.method.is_observer(i)]
    assert observers
    g = torch.Generator().manual_seed(3)
    for i in observers:
        layer = cache.layers[i]
        B, H = layer._k.shape[0], model.config.num_attention_heads
        valid = layer.full_valid()
        logits = (torch.randn(B, H, valid.shape[1], generator=g) * 3).masked_fill(~valid.unsqueeze(1), float("-inf"))
        start = cache._candidate_start(layer)
        assert start is not None and start.tolist() == [(~valid[b, :layer.seen]).sum().item() + 2 for b in range(B)]
        want = cache.method.decode_scores(logits, valid)
        got = cache.range_scores(layer, logits, start)
        finite = torch.isfinite(want)
        assert finite.any() and torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-7)
        layer._pos = layer._pos.clone()
        layer._pos[0, :, layer.seen - 5] = -1                         # a hole: not one range any more
        assert cache._candidate_start(layer) is None


def _interpreted_gpu_paths(monkeypatch):
    """The HF path's GPU branches with every kernel entry point on its Triton kernel (interpreted on CPU)."""
    import sys

    from sparse_hf.kernels import dispatch
    original, original_fused = dispatch.use_triton, dispatch.kernels_run_fused

    def use_triton(backend, kernel, *tensors):
        if backend == "auto" and dispatch.HAS_TRITON and dispatch.is_interpreted(kernel):
            backend = "triton"
        return original(backend, kernel, *tensors)

    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("sparse_hf"):
            if getattr(mod, "use_triton", None) is original:
                monkeypatch.setattr(mod, "use_triton", use_triton)
            if getattr(mod, "kernels_run_fused", None) is original_fused:
                monkeypatch.setattr(mod, "kernels_run_fused", lambda t: t.dtype in dispatch.TRITON_DTYPES)


@pytest.mark.parametrize("arch,bits", [("qwen2", 4), ("qwen3", 8)])
def test_fused_rebuild_gives_the_two_kernel_tokens(arch, bits, monkeypatch):
    # the static decode step on its GPU path (interpreted Triton): the one-kernel rebuild (fused_rebuild=True)
    # against the gather + up + writeback path (fused_rebuild=False), over flushes, with left padding and k_norm
    from sparse_hf.kernels.deltakv_fused import _fused_rebuild_kernel
    from sparse_hf.kernels.dispatch import is_interpreted
    if not is_interpreted(_fused_rebuild_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 before sparse_hf.kernels is imported")
    from sparse_hf.kernels import deltakv_fused
    _interpreted_gpu_paths(monkeypatch)
    calls = []
    run = deltakv_fused.deltakv_rebuild_fused
    monkeypatch.setattr(deltakv_fused, "deltakv_rebuild_fused", lambda *a, **k: (calls.append(1), run(*a, **k))[1])
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((40, 27))
    outs = []
    for fused in (False, True):
        cfg = dict(_config(model, 6, bits), fused_rebuild=fused)
        outs.append(greedy(model, ids, mask, new_tokens=12, cache_implementation="deltakv", cache_config=cfg,
                           output_logits=True, return_dict_in_generate=True))
        layers = [layer for layer in outs[-1].past_key_values.layers if isinstance(layer, DeltaKVLayer)]
        assert all(layer.static_ok and layer.scratch > 0 for layer in layers)
        assert bool(calls) == fused                                # the one-kernel path ran only when asked
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
