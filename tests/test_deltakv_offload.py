"""DeltaKV ``offload_latents=True``: latents in host memory (pinned on CUDA, read in place by the GPU), everything
else where it was. The outputs equal the on-device layout's token for token, the device byte count no longer holds
the latents (they move to ``host_bytes``), and the host store's in-place writes equal the state's ``_write_rows``.
``-m gpu``: eager and CUDA-graph decode in bf16 give the on-GPU layout's tokens, and the latents sit in pinned
host pages that the GPU addresses in place."""

import pytest
import torch

from sparse_hf import kv_usage
from sparse_hf.bench_cli import parse_knob
from sparse_hf.deltakv import DeltaKVCompressor, offload
from sparse_hf.deltakv.quant import QuantizedLatent, quantize
from sparse_hf.deltakv.state import _write_rows
from sparse_hf.hf.deltakv_cache import CompressedCache
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from sparse_hf.methods.deltakv import DeltaKVConfig
from helpers import greedy, left_padded_batch, tiny_model

KNOBS = dict(full_attn_layers="0,1", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
             deltakv_neighbor_count=2)


def _config(model, budget, bits, **extra):
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    return dict(KNOBS, compressor=comp, num_top_tokens=budget, kv_quant_bits=bits, **extra)


def _model(arch):
    """A tiny model that never stops early (the random weights pick the EOS id within a few tokens otherwise)."""
    model = tiny_model(arch, layers=4)
    model.generation_config.eos_token_id = None
    return model


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]


@pytest.mark.parametrize("arch,budget,bits,prefetch", [("llama", 6, 0, True), ("qwen2", 0.25, 4, True),
                                                       ("qwen3", 6, 8, True), ("qwen2", 6, 4, False)])
def test_offloaded_latents_give_the_same_tokens_and_logits(arch, budget, bits, prefetch, monkeypatch):
    # left padding (rows with different counts), flushes during decode, and a store that grows many times
    # (capacity 1, 2, 4, ... rows instead of 256); with and without the prefetch of the picked latents
    monkeypatch.setattr(offload, "MIN_CAPACITY", 1)
    monkeypatch.setattr(CompressedCache, "prefetch_offloaded", prefetch)
    taken = []
    take = offload.LatentPrefetch.take
    monkeypatch.setattr(offload.LatentPrefetch, "take", lambda self, *a: taken.append(take(self, *a)) or taken[-1])
    model = _model(arch)
    ids, mask = left_padded_batch((50, 31))
    kw = dict(new_tokens=30, cache_implementation="deltakv", output_logits=True, return_dict_in_generate=True)
    ref = greedy(model, ids, mask, cache_config=_config(model, budget, bits), **kw)
    off = greedy(model, ids, mask, cache_config=_config(model, budget, bits, offload_latents=True), **kw)
    assert torch.equal(ref.sequences, off.sequences)
    for a, b in zip(ref.logits, off.logits):
        assert torch.equal(a, b)
    layers = _layers(off.past_key_values)
    assert all(layer.static_ok for layer in layers)                   # the static decode path ran
    hits = sum(z is not None for z in taken)
    assert hits > 20 if prefetch else hits == 0                       # every layer of a step took its prefetch
    assert not prefetch or all(z is not None for z in taken[len(taken) // 2:])   # (at first: a later layer's
    # scratch is sized when it runs, after the launch)
    assert off.sequences.shape[1] == ids.shape[1] + 30
    assert all(layer.state.offloaded.capacity > 8 for layer in layers)    # it grew during the run
    for a, b in zip(_layers(ref.past_key_values), layers):
        assert a.state.counts == b.state.counts
        for x, y in zip(a.state.latent, b.state.latent):
            assert (x is None) == (y is None)
            if x is not None:   # every stored row, row by row (rows past a row's own count are never read)
                for row, n in enumerate(a.state.counts):
                    live = a.state.clustering.num_latents(n)
                    assert torch.equal(x[row, :live], y[row, :live])


def test_the_device_byte_count_leaves_the_latents_to_host_bytes():
    model = _model("qwen3")
    ids, mask = left_padded_batch((60, 45))
    kw = dict(new_tokens=6, cache_implementation="deltakv", return_dict_in_generate=True)
    ref = greedy(model, ids, mask, cache_config=_config(model, 6, 4), **kw).past_key_values
    off = greedy(model, ids, mask, cache_config=_config(model, 6, 4, offload_latents=True), **kw).past_key_values
    latents = sum(layer.state.latent.nbytes() for layer in _layers(ref))
    assert latents > 0
    a, b = kv_usage(ref), kv_usage(off)
    assert a.host_bytes == 0
    assert b.bytes == a.bytes - latents                                 # nothing else moved
    host = sum(layer.state.offloaded.nbytes() for layer in _layers(off))
    assert b.host_bytes == host >= latents                              # the host store's whole capacity
    assert all("latents" not in layer.bytes_by_part() for layer in _layers(off))
    assert "in host memory" in b.summary()


def test_beam_search_reindexes_the_host_store():
    model = _model("qwen3")
    ids, mask = left_padded_batch((48, 20))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3,
              cache_implementation="deltakv", return_dict_in_generate=True)
    ref = model.generate(**kw, cache_config=_config(model, 6, 8))
    off = model.generate(**kw, cache_config=_config(model, 6, 8, offload_latents=True))
    assert torch.equal(ref.sequences, off.sequences)
    assert all(layer.state.offloaded.hosts[0].shape[0] == 6 for layer in _layers(off.past_key_values))


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_in_place_writes_equal_write_rows(bits):
    # several flushes of rows with different counts into a store that grows, against the state's own _write_rows
    g = torch.Generator().manual_seed(0)
    B, w = 3, 32
    store, ref, width = offload.OffloadedLatents(), None, 0
    counts = [0] * B
    for C in (5, 3, 9, 0, 300):
        add = torch.randint(0, C + 1, (B,), generator=g).tolist()
        dest = torch.tensor(counts).view(B, 1) + torch.arange(C).view(1, C)
        mask = torch.arange(C).view(1, C) < torch.tensor(add).view(B, 1)
        counts = [n + a for n, a in zip(counts, add)]
        width = max(counts)
        new = quantize(torch.randn(B, C, w, generator=g), bits)
        got = store.write(width, dest, mask, new)
        ref = QuantizedLatent(*(None if t is None else _write_rows(p, width, dest, mask, t, 0)
                                for p, t in zip(ref or (None,) * 3, new)))
        for x, y in zip(ref, got):
            assert (x is None) == (y is None)
            if x is not None:
                assert y.shape == x.shape
                for row, n in enumerate(counts):
                    assert torch.equal(x[row, :n], y[row, :n])
    assert store.capacity == 512 and store.nbytes() == sum(h.numel() * h.element_size() for h in store.hosts if
                                                           h is not None)


def test_the_knob_is_checked_and_reaches_bench():
    with pytest.raises(ValueError, match="offload_latents"):
        DeltaKVConfig(offload_latents="yes")
    assert DeltaKVConfig(offload_latents=True).offload_latents is True
    assert parse_knob("deltakv:offload_latents=true") == ("deltakv", "offload_latents", True)
    assert parse_knob("deltakv:offload_latents=False") == ("deltakv", "offload_latents", False)


def test_bench_reports_host_bytes_with_the_knob():
    from sparse_hf.bench import build_model, run_case

    cpu = torch.device("cpu")
    model = build_model("tiny", cpu, torch.float32)
    knobs = [("deltakv", "full_attn_layers", "0"), ("deltakv", "kv_quant_bits", 4)]
    ref = run_case(model, cpu, 300, 1, "deltakv", 0.1, 3, None, knobs)
    off = run_case(model, cpu, 300, 1, "deltakv", 0.1, 3, None, knobs + [("deltakv", "offload_latents", True)])
    assert "kv_host_bytes" not in ref and off["kv_host_bytes"] > 0
    assert off["kv_bytes"] < ref["kv_bytes"]


def test_a_cpu_store_says_which_devices_it_supports():
    with pytest.raises(ValueError, match="CUDA and CPU"):
        offload.host_buffer((1, 4, 2), torch.int8, torch.device("meta"))
    with pytest.raises(RuntimeError, match="not pinned"):
        offload.device_view(torch.zeros(4), torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("arch,bits", [("llama", 0), ("qwen3", 4), ("qwen2", 8)])
def test_gpu_offload_matches_on_gpu_latents_eager_and_graph(arch, bits, monkeypatch):
    """bf16 on CUDA: the latents live in pinned host pages that the GPU reads in place; eager decode and CUDA-graph
    decode (re-captured after store growth and flushes) give the on-GPU layout's tokens."""
    monkeypatch.setattr(offload, "MIN_CAPACITY", 1)          # the store grows (new pinned pages) during decode
    model = _model(arch).to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch((50, 38))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(new_tokens=40, cache_implementation="deltakv", return_dict_in_generate=True, output_logits=True)

    def run(graph, off):
        cfg = _config(model, 6, bits, offload_latents=off, cuda_graph=graph)
        cfg["compressor"] = cfg["compressor"].to("cuda", torch.bfloat16)
        return greedy(model, ids, mask, cache_config=cfg, **kw)

    for graph in (False, True):
        ref, off = run(graph, False), run(graph, True)
        assert torch.equal(ref.sequences, off.sequences), f"cuda_graph={graph}"
        for a, b in zip(ref.logits, off.logits):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
        if graph:
            assert off.past_key_values.graph_decoder.captures >= 1   # planned capacity: no re-capture per flush
        for layer in _layers(off.past_key_values):
            store = layer.state.offloaded
            for host, view, field in zip(store.hosts, store.views, layer.state.latent):
                if host is not None:
                    assert host.is_pinned() and not host.is_cuda and view.is_cuda
                    assert field.data_ptr() == view.data_ptr() == host.data_ptr()
        assert kv_usage(off.past_key_values).host_bytes > 0


def test_engine_offload_gives_the_same_tokens_and_more_filter_slots():
    from engine_helpers import engine_tokens, random_prompts
    from sparse_hf.engine import LLM

    model = tiny_model("qwen2", layers=4)
    knobs = dict(KNOBS, full_attn_layers=[0, 2], compressor=_config(model, 6, 4)["compressor"], num_top_tokens=6,
                 kv_quant_bits=4, num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16)
    prompts = random_prompts((20, 50, 77))
    ref = LLM(model, sparse_method="deltakv", **knobs)
    off = LLM(model, sparse_method="deltakv", offload_latents=True, **knobs)
    host = []
    step = off.step
    off.step = lambda: (step(), host.append(off.pool.store.host_bytes()))[0]
    assert engine_tokens(off, prompts, 30) == engine_tokens(ref, prompts, 30)
    assert max(host) > 0
    # the memory the latents took now pays for more filter slots (the store's device bytes no longer hold them)
    assert off.pool.group_slots[0] > ref.pool.group_slots[0]
    off.pool.check_whole()


@pytest.mark.gpu
def test_gpu_engine_offload_gives_the_same_tokens():
    """The engine on CUDA (bf16, decode graphs): offloaded latents give the on-GPU store's tokens."""
    from engine_helpers import engine_tokens, random_prompts
    from sparse_hf.engine import LLM

    model = tiny_model("llama", layers=4)
    comp = _config(model, 6, 4)["compressor"].to("cuda", torch.bfloat16)
    knobs = dict(KNOBS, full_attn_layers=[0, 2], compressor=comp, num_top_tokens=6, kv_quant_bits=4,
                 num_kv_slots=1024, max_model_len=256, chunk_prefill_size=16, device="cuda", dtype=torch.bfloat16)
    prompts = random_prompts((20, 50, 77))
    ref = engine_tokens(LLM(model, sparse_method="deltakv", **knobs), prompts, 30)
    off_llm = LLM(model, sparse_method="deltakv", offload_latents=True, **knobs)
    assert engine_tokens(off_llm, prompts, 30) == ref
