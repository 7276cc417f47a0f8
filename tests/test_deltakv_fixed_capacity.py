"""DeltaKV with a fixed capacity (``cuda_graph=True``, or :meth:`CompressedCache.plan_generation`): every buffer a
captured decode step reads is sized for the whole generation at the prompt's end, so flushes write into the same
tensors and a CUDA graph is captured once per batch shape, not once per flush; tokens and logits are those of the
growing state. ``-m gpu``: ``generate(..., cuda_graph=True)`` captures once over several flushes and equals eager."""

import pytest
import torch

import sparse_hf
from sparse_hf.deltakv.state import Clustering, CompressedState, flush
from sparse_hf.hf.cuda_graph import GraphDecoder
from sparse_hf.hf.deltakv_cache import CompressedCache
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from helpers import greedy, left_padded_batch, tiny_model
from test_deltakv_graph_replay import _gpu_code_paths, _replay_like_graph_decoder
from test_deltakv_static import KNOBS, _config

NEW = 30        # new tokens: with num_recent_tokens=4, a flush every 4 steps (>= 6 flushes)


def _run(model, ids, mask, cfg, graph, new=NEW):
    """``generate`` with the fixed capacity on (``cuda_graph=True``: on CPU the steps run eagerly, planned as under
    graphs) or off."""
    out = greedy(model, ids, mask, new_tokens=new, min_new_tokens=new, cache_implementation="deltakv",
                 cache_config=dict(cfg, cuda_graph=graph), output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + new            # no early stop: every planned step runs
    return out


def _recording(monkeypatch):
    """Patch ``eager_step_reason`` (asked at every decode step's start, before the graph decision) to note what a
    :class:`GraphDecoder` compares: its buffer signature, whether the step may replay, and the compressed counts."""
    steps = []
    original = CompressedCache.eager_step_reason

    def eager_step_reason(self):
        reason = original(self)
        counts = [list(layer.state.counts) for layer in self.layers if isinstance(layer, DeltaKVLayer)]
        steps.append((GraphDecoder(None, self, forward=lambda **kw: None)._signature(), reason, counts))
        return reason

    monkeypatch.setattr(CompressedCache, "eager_step_reason", eager_step_reason)
    return steps


def _check_one_signature(steps, min_flushes=4):
    """Every step after the first static one replays (no eager reason) under one signature, across flushes."""
    steady = [s for s in steps if s[1] is None]
    assert len(steady) >= len(steps) - 2, [s[1] for s in steps]
    assert all(s[0] == steady[0][0] for s in steady), "a flush changed what a captured step reads"
    flushes = sum(a[2] != b[2] for a, b in zip(steady, steady[1:]))
    assert flushes >= min_flushes


@pytest.mark.parametrize("arch,budget,bits,offload", [
    ("llama", 6, 0, False), ("qwen3", 6, 8, False), ("qwen2", 0.25, 4, False), ("llama", 0.25, 0, True),
    ("qwen3", 0.25, 4, True), ("llama", 100, 8, False)])
def test_flushes_keep_every_buffer_and_the_tokens(arch, budget, bits, offload, monkeypatch):
    # left padding, count and fraction budgets, 0/8/4-bit latents, host latents, a budget above every count
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((50, 31))
    cfg = dict(_config(model, budget, bits), offload_latents=offload)
    grown = _run(model, ids, mask, cfg, graph=False)
    steps = _recording(monkeypatch)
    fixed = _run(model, ids, mask, cfg, graph=True)
    _check_one_signature(steps)
    assert torch.equal(grown.sequences, fixed.sequences)
    for a, b in zip(grown.logits, fixed.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cache = fixed.past_key_values
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    for layer, other in zip(layers, (x for x in grown.past_key_values.layers if isinstance(x, DeltaKVLayer))):
        state = layer.state
        assert state.counts == other.state.counts
        assert state.capacity >= state.width and state.comp_pos.shape[1] == state.capacity
        assert layer.static_ok and layer.scratch == min(state.capacity, cache.method.top_count(
            cache.planned_length, prefill=False))
    assert cache.planned_length == ids.shape[1] + NEW
    assert getattr(grown.past_key_values, "planned_length", None) is None       # the mode is off without graphs


def test_the_state_is_allocated_before_its_first_flush(monkeypatch):
    # prompts too short to compress at the prompt's end: the reserved state exists from there on anyway, so the
    # first flush during decode does not change what a captured step reads either
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((9, 6))        # sinks 2 + 2 * recent 4 = 10: nothing to compress yet
    cfg = _config(model, 0.25, 4)
    steps = _recording(monkeypatch)
    fixed = _run(model, ids, mask, cfg, graph=True)
    assert steps[0][2] == [[0, 0]] * 2                               # no compressed token at the first decode step
    _check_one_signature(steps)
    grown = _run(model, ids, mask, cfg, graph=False)
    assert torch.equal(grown.sequences, fixed.sequences)


@pytest.mark.parametrize("arch,budget", [("llama", 6), ("qwen3", 0.25)])
def test_a_padded_batch_gives_each_row_alone(arch, budget):
    model = tiny_model(arch, layers=4)
    lengths = (44, 25, 3)            # the last row starts compressing during decode
    ids, mask = left_padded_batch(lengths)
    cfg = _config(model, budget, 8)
    batch = _run(model, ids, mask, cfg, graph=True)
    for row, n in enumerate(lengths):
        alone = _run(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:], cfg, graph=True)
        assert torch.equal(batch.sequences[row, -NEW:], alone.sequences[0, -NEW:]), f"row {row}"
        for a, b in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)
        assert ([x.state.counts[row] for x in batch.past_key_values.layers if isinstance(x, DeltaKVLayer)]
                == [x.state.counts[0] for x in alone.past_key_values.layers if isinstance(x, DeltaKVLayer)])


@pytest.mark.parametrize("budget,padded", [(6, False), (0.25, True)])
def test_a_graph_decoder_captures_once_across_flushes(budget, padded, monkeypatch):
    # GraphDecoder's decisions, emulated on CPU (test_deltakv_graph_replay): with a plan, one capture serves every
    # flush, and each replay reads exactly what the capture read; a plan made after the prompt (a continued
    # generation) re-allocates the state once
    from test_deltakv_static import _decoder

    _gpu_code_paths(monkeypatch)
    model, cache, step = _decoder(budget=budget, padded=padded, layers=5 if padded else 4)
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    steps = 40
    cache.plan_generation(cache.layers[0].seen, steps + 1)
    counts = [list(layer.state.counts) for layer in layers]
    start = cache.layers[0].seen - torch.tensor(layers[0].pad).view(-1, 1)
    token = torch.randint(1, 100, (2, 1), generator=torch.Generator().manual_seed(5))
    replays, captures = _replay_like_graph_decoder(model, cache, steps, start, token)
    assert [list(layer.state.counts) for layer in layers] != counts
    assert captures == 1 and replays >= steps - 3      # the re-sized state and the warm-up step run eagerly


def test_the_reservation_is_counted_and_no_larger_than_the_generation_needs():
    model = tiny_model("qwen2", layers=4)
    ids, mask = left_padded_batch((50, 31))
    cfg = _config(model, 0.25, 4)
    fixed = _run(model, ids, mask, cfg, graph=True).past_key_values
    grown = _run(model, ids, mask, cfg, graph=False).past_key_values
    usage = sparse_hf.kv_usage(fixed)
    assert usage.bytes == sum(layer.allocated_bytes() for layer in fixed.layers)
    recent = KNOBS["num_recent_tokens"]
    for layer, other in zip(fixed.layers, grown.layers):
        if not isinstance(layer, DeltaKVLayer):
            continue
        state = layer.state
        # the stores (with their one masked-write row) are what is counted
        stored = sum(t.numel() * t.element_size() for t in state._stores.values())
        assert sum(state.bytes_by_part().values()) == stored
        # the most a row can compress by the planned length (which is one token past the last step's)
        assert state.width <= state.capacity <= state.width + recent
        assert layer.capacity == other.capacity == KNOBS["num_sink_tokens"] + 2 * recent
    assert usage.bytes <= sparse_hf.kv_usage(grown).bytes * 1.3


@pytest.mark.parametrize("bits,offload", [(0, False), (8, False), (4, False), (4, True)])
def test_a_reserved_state_flushes_in_place_to_the_growing_values(bits, offload):
    # the core: the same flushes into a reserved state and a growing one give the same values where tokens are held
    # (their tails masked), with every tensor at the address of the first flush; past the capacity it grows
    from sparse_hf.deltakv.projections import DeltaKVProjections

    torch.manual_seed(0)
    proj = DeltaKVProjections(num_layers=1, kv_heads=2, head_dim=4, latent=8, layer_indices=[0])
    cl = Clustering(num_sink=2, step=3, neighbor_count=2, quant_bits=bits, offload_latents=offload)
    grown, fixed = CompressedState(2, cl), CompressedState(2, cl)
    fixed.reserve(20)
    pos0 = 0
    ptrs = None
    for counts in ([5, 0], [4, 8], [6, 6], [5, 4]):
        x = torch.randn(2, 8, 16)
        pos = torch.arange(pos0, pos0 + 8).expand(2, 8) + 2
        sinks = (torch.randn(2, 2, 16), torch.arange(2).expand(2, 2))
        for state in (grown, fixed):
            flush(state, x, pos, counts, proj, 0, sinks if state.needs_sinks(counts) else None)
        pos0 += 8
        tensors = [fixed.comp_pos, fixed.center_x, fixed.center_pos, fixed.fathers, *fixed.latent]
        now = [None if t is None else (t.data_ptr(), t.shape) for t in tensors]
        assert ptrs is None or now == ptrs
        ptrs = now
        assert fixed.counts == grown.counts and fixed.comp_pos.shape[1] == 20
        for name in ("comp_pos", "center_pos", "center_x", "fathers"):
            g, f = getattr(grown, name), getattr(fixed, name)
            assert torch.equal(f[:, :g.shape[1]], g), name
            assert not f[:, g.shape[1]:].any() if name == "center_x" else bool((f[:, g.shape[1]:] == -1).all())
        for g, f in zip(grown.latent, fixed.latent):
            assert (g is None) == (f is None)
            if g is not None:
                assert torch.equal(f[:, :g.shape[1]], g)
    assert fixed.width == 20
    flush(fixed, torch.randn(2, 8, 16), torch.arange(40, 48).expand(2, 8), [3, 0], proj, 0)
    assert fixed.capacity == 23 and fixed.comp_pos.shape[1] == 23         # past the reservation: grown
    with pytest.raises(ValueError, match="reserve at least"):
        fixed.reserve(5)


def test_the_automatic_default_plans_only_on_cuda():
    # cuda_graph unset: graphs run on CUDA only, so only there is the capacity reserved up front; never with False
    model = tiny_model("llama", layers=4)
    ids, mask = left_padded_batch((50, 31))
    for graph in (None, False):
        cfg = _config(model, 6)
        if graph is not None:
            cfg["cuda_graph"] = graph
        out = greedy(model, ids, mask, new_tokens=6, cache_implementation="deltakv", cache_config=cfg,
                     return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.planned_length is None and all(
            layer.state.capacity == 0 for layer in cache.layers if isinstance(layer, DeltaKVLayer))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, None])
@pytest.mark.parametrize("arch,dtype,budget,bits,offload", [
    ("llama", torch.bfloat16, 0.25, 4, False), ("qwen3", torch.float32, 6, 0, False),
    ("qwen2", torch.bfloat16, 6, 8, True)])
def test_generate_with_cuda_graphs_captures_once_per_batch_shape(arch, dtype, budget, bits, offload, cuda_graph):
    model = tiny_model(arch, layers=4).to("cuda", dtype)
    ids, mask = left_padded_batch((50, 38))
    ids, mask = ids.cuda(), mask.cuda()
    cfg = dict(_config(model, budget, bits), offload_latents=offload)
    cfg["compressor"] = cfg["compressor"].to("cuda", dtype)
    kw = dict(new_tokens=40, min_new_tokens=40, cache_implementation="deltakv", return_dict_in_generate=True,
              output_logits=True)
    eager = greedy(model, ids, mask, cache_config=dict(cfg, cuda_graph=False), **kw)
    graph = greedy(model, ids, mask, cache_config=dict(cfg, **({} if cuda_graph is None else {"cuda_graph": True})),
                   **kw)
    layer = next(x for x in graph.past_key_values.layers if isinstance(x, DeltaKVLayer))
    # the prompt's end leaves at most 2 * recent raw tokens; 40 steps later >= 4 more flushes of recent each
    assert layer.state.width >= 50 - KNOBS["num_sink_tokens"] - 2 * KNOBS["num_recent_tokens"] + 4 * KNOBS[
        "num_recent_tokens"]
    assert graph.past_key_values.planned_length == 50 + 40
    assert graph.past_key_values.graph_decoder.captures == 1
    assert torch.equal(eager.sequences, graph.sequences)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(eager.logits, graph.logits):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bits,offload", [(8, False), (4, True)])
def test_beam_search_reindexes_the_reserved_stores(bits, offload):
    # beams reorder the rows at every step (graphs are off for them, the plan is made anyway): the reserved stores
    # follow the rows, and the tokens are the growing state's
    model = tiny_model("llama", layers=4)
    ids, mask = left_padded_batch((50, 31))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False,
              cache_implementation="deltakv", return_dict_in_generate=True)
    cfg = dict(_config(model, 6, bits), offload_latents=offload)
    grown = model.generate(**kw, cache_config=dict(cfg, cuda_graph=False))
    fixed = model.generate(**kw, cache_config=dict(cfg, cuda_graph=True))
    assert torch.equal(grown.sequences, fixed.sequences)
    layer = next(x for x in fixed.past_key_values.layers if isinstance(x, DeltaKVLayer))
    assert layer.state.capacity and layer.state.comp_pos.shape[1] == layer.state.capacity


def test_max_length_plans_like_max_new_tokens():
    model = tiny_model("llama", layers=4)
    ids, mask = left_padded_batch((50, 31))
    runs = [model.generate(input_ids=ids, attention_mask=mask, do_sample=False, cache_implementation="deltakv",
                           cache_config=dict(_config(model, 6), cuda_graph=True), return_dict_in_generate=True,
                           min_new_tokens=14, **length) for length in (dict(max_new_tokens=14), dict(max_length=64))]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].past_key_values.planned_length == runs[1].past_key_values.planned_length == 64


def test_a_second_turn_re_plans_and_keeps_the_tokens():
    # the second generate call continues the cache: its plan grows the reservation once, to the new final length
    from test_multiturn import configs, two_turns

    model = tiny_model("llama", layers=4)
    runs = [two_turns(model, cache_implementation="deltakv", output_logits=True,
                      cache_config=dict(configs(model, False)["deltakv"], cuda_graph=graph)) for graph in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cache = runs[1].past_key_values
    assert cache.planned_length == runs[1].sequences.shape[1]
    state = next(x for x in cache.layers if isinstance(x, DeltaKVLayer)).state
    assert state.width <= state.capacity == state.comp_pos.shape[1]


def test_signature_tensor_keys_compare_by_object_then_by_memory():
    """The DeltaKV buffer signature's tensors: the same object, or a new view of the same memory with the same shape,
    strides and dtype, is equal (no re-capture); anything a captured step would read differently is not, at any
    position of the layer's tensors (the fast path compares them all by object at once)."""
    from sparse_hf.hf.deltakv_layer import TensorKeys

    a, b = torch.zeros(4, 3), torch.zeros(2)
    key = TensorKeys((b, a, None))
    assert key == TensorKeys((b, a, None)) and key == TensorKeys((b, a[:], None))   # the objects, a new full view
    for other in (a[:2], a.t(), a.clone(), a.view(torch.int32), None):   # shape, strides, memory, dtype, absent
        assert key != TensorKeys((b, other, None))
    assert key != TensorKeys((b, a)) and key != TensorKeys((b, a, b)) and key != TensorKeys((a, b, None))
    assert key.tensors[1] is a                                        # held: its memory cannot be reused meanwhile


def test_the_signature_follows_every_buffer_a_static_step_reads():
    """A DeltaKV layer's buffer signature changes when a buffer a captured step reads is replaced by other memory (its
    slot buffers and counters, the raw positions, the state's tensors, the shared scratch) and holds for a new view
    of the same memory (the slot buffers are keys, not ``SlotLayer``'s address ints, since issue 12)."""
    from test_deltakv_static import _decoder

    _, cache, _ = _decoder()
    layer = next(x for x in cache.layers if isinstance(x, DeltaKVLayer))
    before = layer.buffer_signature()
    assert layer.buffer_signature() == before
    for owner, name in [(layer, "_k"), (layer, "_v"), (layer, "_pos"), (layer, "_counters"), (layer, "_raw_pos"),
                        (layer, "col_offset"), (layer.state, "comp_pos"), (layer.state, "center_x")]:
        kept = getattr(owner, name)
        setattr(owner, name, kept.clone())
        assert layer.buffer_signature() != before, name
        setattr(owner, name, kept[:])
        assert layer.buffer_signature() == before, name
        setattr(owner, name, kept)
    layer.shared.reserve(layer._k, layer._v, layer.shared.k.shape[2] + 1)    # a re-size: new shared buffers
    assert layer.buffer_signature() != before


def test_the_flush_counts_memo_follows_length_padding_and_counts():
    """``_flush_counts`` gives its last answer again only while the length, the padding and the compressed counts
    equal those it was made for (the compressed layers of a step share it): a change of any of them, in a new list
    or in the same one, gives what a cache without the memo computes."""
    from test_deltakv_static import _decoder

    _, cache, _ = _decoder()
    first, second = [x for x in cache.layers if isinstance(x, DeltaKVLayer)][:2]

    def fresh(layer, seen):
        cache._counts_memo = None
        return cache._flush_counts(layer, seen)

    seen = first.seen
    answer = cache._flush_counts(first, seen)
    assert cache._flush_counts(second, seen) is answer                  # the next layer, same rows: shared
    changes = [lambda: None,                                              # a longer length (below)
               lambda: setattr(first.state, "counts", [n - 8 for n in first.state.counts]),
               lambda: first.pad.__setitem__(0, first.pad[0] - 8)]        # in place: the memo holds a copy
    for change, at in zip(changes, (seen + 8, seen, seen)):
        before = cache._flush_counts(first, seen)
        change()
        got = cache._flush_counts(first, at)
        assert got != before and got == fresh(first, at)
