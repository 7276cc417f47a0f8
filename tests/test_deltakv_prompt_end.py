"""DeltaKV's prompt end on the HF path (issue 12's TTFT): the prefill forward and the compression at its end read
nothing back from the device when the prompt has no padding, read the padding once (for all compressed layers) when
it has, launch a pinned number of device ops per compressed layer whatever the batch, and the shortcuts that make
this so (no padding read, no sort of the slots when every slot is live) compress exactly what the general path does.

Counted on the CPU with ``benchmarks/count_deltakv_prefill.py``'s counter (aten ops that launch a CUDA kernel, and
host reads / pageable uploads / data-shaped ops that make the host wait for a CUDA device)."""

import sys
from pathlib import Path

import pytest
import torch

import sparse_hf
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.hf.deltakv_cache import CompressedCache
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from helpers import left_padded_batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from count_deltakv_prefill import count_prefill  # noqa: E402

#: Launches of the prompt-end compression (``CompressedCache._flush``) of the first compressed layer, which makes the
#: flush's index work, and of each later one, which reuses it, at the bench's knobs (int4 latents, one father, a
#: planned capacity). 151 in every layer before the work on issue 12's TTFT (2026-12-02), then 139 (no syncs), 131
#: (scatter indices shared by the fields), 131 / 95 (index work shared by the layers). Lower them when a change
#: removes some; never raise them without a reason in docs/deltakv/hf_bytes_and_launches.md ("Prompt end").
FLUSH_LAUNCHES_FIRST = 131
FLUSH_LAUNCHES_LATER = 95
#: Launches outside the flush of one compressed layer's prompt attention (raw positions, SDPA).
ATTEND_LAUNCHES = 6


def _cache(model, length, bits=4, fathers=1):
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    cache = sparse_hf.build_cache("deltakv", model.config, dict(
        compressor=comp, full_attn_layers="0", num_sink_tokens=4, num_recent_tokens=8, num_top_tokens=0.1,
        cluster_ratio=0.25, deltakv_neighbor_count=fathers, kv_quant_bits=bits, cuda_graph=False))
    cache.prefill_target = length               # as sparse-hf bench drives it
    cache.plan_generation(length, 9)
    sparse_hf.prepare_model(model)
    return cache


@pytest.mark.parametrize("batch", [1, 3])
def test_an_unpadded_prompt_end_reads_nothing_back_and_launches_a_pinned_count(batch):
    model = tiny_model("qwen2", layers=4)
    ids = torch.randint(1, 100, (batch, 64), generator=torch.Generator().manual_seed(0))
    cache = _cache(model, 64)
    counter = count_prefill(model, cache, ids)
    assert counter.syncs == {}, counter.syncs
    assert len(counter.per_layer) == 3                               # layers 1..3 compressed, each once
    first, *later = sorted(counter.per_layer)
    assert counter.per_layer[first] == FLUSH_LAUNCHES_FIRST, counter.per_layer
    assert {counter.per_layer[i] for i in later} == {FLUSH_LAUNCHES_LATER}, counter.per_layer
    assert counter.counts["compressed"] == 3 * ATTEND_LAUNCHES
    # 60 tokens after the 4 sinks: all but the last 8-token buffer and the remainder (60 - 8) % 8 compressed
    assert all(layer.state.counts == [48] * batch for layer in cache.layers if isinstance(layer, DeltaKVLayer))


def test_a_padded_prompt_end_reads_the_padding_once_for_every_layer():
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((64, 41))
    cache = _cache(model, 64)
    counter = count_prefill(model, cache, ids, attention_mask=mask)
    assert counter.syncs == {"flush": {"tolist": 1}}, counter.syncs
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    assert all(layer.pad == [0, 23] and layer.col_offset.view(-1).tolist() == [0, 23] for layer in layers)


def _state(cache):
    """Every tensor a compressed layer holds after the prompt, and its host lists."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, DeltaKVLayer):
            s = layer.state
            out.append((s.counts, layer.pad, layer.col_offset, s.comp_pos, s.center_x, s.center_pos, s.fathers,
                        *s.latent, layer.keys, layer.values, layer.positions, layer.raw_pos))
    return out


@pytest.mark.parametrize("bits,fathers", [(4, 1), (0, 2)])
def test_the_shortcuts_compress_what_the_general_path_does(bits, fathers, monkeypatch):
    # the general path: the padding read from the device and the slots sorted by validity, as for a padded prompt
    model = tiny_model("qwen2", layers=4)
    ids = torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    fast = _cache(model, 64, bits, fathers)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=fast, use_cache=True)
    original = CompressedCache._flush

    def general(self, module, layer, *args):
        layer.masked = True
        return original(self, module, layer, *args)

    monkeypatch.setattr(CompressedCache, "_flush", general)
    slow = _cache(model, 64, bits, fathers)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=slow, use_cache=True)
    for a, b in zip(_state(fast), _state(slow), strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y)
            else:
                assert x == y


@pytest.mark.parametrize("arch", ["qwen3", "llama"])            # pre-norm keys kept / keys by inverse RoPE
def test_layers_sharing_one_flush_plan_hold_what_each_would_make_alone(arch, monkeypatch):
    # a padded batch and flushes during decode (the general path: sorted slots, compacted buffers); the unshared
    # run makes every layer's index work itself
    from helpers import greedy

    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((40, 27))

    def run():
        torch.manual_seed(0)
        comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
        cfg = dict(compressor=comp, full_attn_layers="0", num_sink_tokens=2, num_recent_tokens=4, cluster_ratio=0.25,
                   num_top_tokens=0.25, kv_quant_bits=4)
        out = greedy(model, ids, mask, new_tokens=14, cache_implementation="deltakv", cache_config=cfg,
                     return_dict_in_generate=True)
        return out.sequences, _state(out.past_key_values)

    shared = run()
    plans = []
    original = CompressedCache._flush_plan

    def alone(self, *args):
        self._plan = None
        plans.append(1)
        return original(self, *args)

    monkeypatch.setattr(CompressedCache, "_flush_plan", alone)
    unshared = run()
    assert len(plans) >= 9                                      # 3 layers, the prompt and at least 2 decode flushes
    assert torch.equal(shared[0], unshared[0])
    for a, b in zip(shared[1], unshared[1], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_core_flush_reuses_rows_only_where_they_fit():
    from sparse_hf.deltakv.projections import DeltaKVProjections
    from sparse_hf.deltakv.state import Clustering, CompressedState, flush

    torch.manual_seed(0)
    proj = DeltaKVProjections(1, 2, 8, 8, [0])
    cl = Clustering(num_sink=2, step=3, quant_bits=4)
    x, pos = torch.randn(2, 20, 32), torch.arange(2, 22).expand(2, 20)
    sinks = (torch.randn(2, 2, 32), torch.arange(2).expand(2, 2))

    def fields(state):
        return [state.counts, state.comp_pos, state.center_x, state.center_pos, state.fathers, *state.latent]

    def run(counts, rows=None):
        state = CompressedState(2, cl)
        used = flush(state, x, pos, counts, proj, 0, sinks, rows=rows)
        return fields(state), used

    alone, rows = run([12, 9])
    shared, used = run([12, 9], rows)
    assert used is rows                                          # the same flush: the rows are reused
    other, used = run([12, 6], rows)
    assert used is not rows                                      # other counts: made anew
    for got, want in ((shared, alone), (other, run([12, 6])[0])):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
