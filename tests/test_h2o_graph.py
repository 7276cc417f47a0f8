"""H2O decode under a CUDA graph (``cache_config={"cuda_graph": True}``, or a :class:`GraphDecoder` of one's own as
``sparse-hf bench --hf-methods h2o+graph`` drives it).

Regression (H200, 2026-12-02, ``docs/bench/run_m_2026-12-02/h2o_graph_error.log``): a replayed step skipped the
score accumulation (it ran only outside a capture), so after the replay the layer held 513 slots but 512 scores and
``maintain_layer`` failed in ``select_keep`` ("size of tensor a (513) must match ... (512)"). The decode step now
adds the new query's attention mass over the layer's whole score buffer with static shapes, inside the step, eager
or captured alike. On CPU the replay is emulated (the steps :class:`GraphDecoder` would replay run as the capture
ran them, and read exactly the tensors the capture read); ``-m gpu`` runs real graphs."""

import pytest
import torch

from sparse_hf.hf.cuda_graph import GraphDecoder
from helpers import decode_greedy, greedy, left_padded_batch, tiny_model
from test_deltakv_graph_replay import _ExternalReads, _gpu_code_paths

KNOBS = dict(num_sink_tokens=2, num_recent_tokens=4, num_top_tokens=6)


def _after_prompt(model, ids, mask, knobs):
    """An h2o cache after the prompt and one generated token: ``(cache, next token [B, 1], its positions [B, 1])``."""
    out = greedy(model, ids, mask, new_tokens=1, cache_implementation="h2o", cache_config=knobs,
                 return_dict_in_generate=True)
    pad = (mask == 0).sum(-1, keepdim=True)                      # a row's positions start after its padding
    return out.past_key_values, out.sequences[:, -1:], out.sequences.shape[1] - 1 - pad


def _decode(model, cache, token, pos, steps, graph: bool):
    """``steps`` greedy decode steps; ``graph``: decided and run as :meth:`GraphDecoder.step` would (warm-up +
    capture when there is room, replay while the buffer signature holds: the step as captured, then
    ``maintain_layer`` for every layer), with each replay's external reads checked against the capture's.
    Returns the tokens ``[B, steps]`` and the number of replays."""
    decoder = GraphDecoder(model, cache)
    ids, step_pos = token.clone(), torch.empty_like(pos)        # static input buffers, as a graph reads them
    signature = captured = None
    tokens, replays = [], 0
    for i in range(steps):
        step_pos.copy_(pos + i)
        replay = graph and decoder._room() and signature is not None and decoder._signature() == signature
        with torch.inference_mode():
            if replay:
                cache.capturing = True
                try:
                    with _ExternalReads() as rec:
                        logits = model(input_ids=ids, position_ids=step_pos, past_key_values=cache,
                                       use_cache=True).logits
                finally:
                    cache.capturing = False
                for layer_idx in range(len(cache.layers)):
                    cache.maintain_layer(layer_idx)
                if captured is None:
                    captured = rec.reads
                assert rec.reads == captured, f"step {i}: a replay would read tensors its capture did not"
                replays += 1
            else:
                room = decoder._room()
                logits = model(input_ids=ids, position_ids=step_pos, past_key_values=cache, use_cache=True).logits
                if graph and room and decoder._room():
                    signature, captured = decoder._signature(), None
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        tokens.append(ids.clone())
    return torch.cat(tokens, 1), replays


@pytest.mark.parametrize("arch,lengths,knobs", [("llama", (30, 21), KNOBS), ("qwen2", (33, 17),
                                                 dict(KNOBS, num_top_tokens=0.25)), ("qwen3", (26, 26), KNOBS)])
def test_h2o_replayed_like_a_graph_gives_eager_tokens(arch, lengths, knobs, monkeypatch):
    _gpu_code_paths(monkeypatch)                         # the GPU's decode path (whole buffers), torch kernels
    model = tiny_model(arch, layers=3)
    ids, mask = left_padded_batch(lengths)
    steps = 24
    runs = {}
    for graph in (False, True):
        cache, token, pos = _after_prompt(model, ids, mask, knobs)
        runs[graph] = _decode(model, cache, token, pos, steps, graph) + (cache,)
    (eager, _, cache_e), (graphed, replays, cache_g) = runs[False], runs[True]
    assert replays >= steps - 4                          # nearly every step replays (the first ones capture)
    assert torch.equal(graphed, eager)
    evicted = False
    for a, b in zip(cache_e.layers, cache_g.layers):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.scores, b.scores)
        assert a.scores.shape == a.positions.shape
        evicted |= bool((a.valid().sum(-1) < int(mask.sum(-1).max()) + steps).any())
    assert evicted, "the budget evicts nothing: the test would not exercise decode eviction"
    # the eager steps are generate's own continuation
    full = greedy(model, ids, mask, new_tokens=steps + 1, cache_implementation="h2o", cache_config=knobs)
    assert torch.equal(full[:, -steps:], eager)


def test_h2o_accepts_cuda_graph():
    import sparse_hf

    cache = sparse_hf.H2OCache(tiny_model().config, cuda_graph=True)
    assert cache.cuda_graph is True


@pytest.mark.gpu
@pytest.mark.parametrize("own_decoder", [False, True])
def test_h2o_graph_equals_eager_on_cuda(own_decoder):
    """CUDA: h2o decode replayed from captured graphs gives eager h2o's tokens, through ``generate`` with
    ``cuda_graph=True`` or a :class:`GraphDecoder` of one's own (as the bench drives it; it warms up on 512 x 1)."""
    import sparse_hf

    model = tiny_model("llama", layers=3).cuda()
    ids, mask = left_padded_batch((48, 33))
    ids, mask = ids.cuda(), mask.cuda()
    steps = 40
    if not own_decoder:
        kw = dict(cache_implementation="h2o", output_logits=True, return_dict_in_generate=True)
        eager = greedy(model, ids, mask, new_tokens=steps, cache_config=dict(KNOBS, cuda_graph=False), **kw)
        graph = greedy(model, ids, mask, new_tokens=steps, cache_config=dict(KNOBS, cuda_graph=True), **kw)
        assert graph.past_key_values.graph_decoder is not None and graph.past_key_values.graph_decoder.captures >= 1
        assert torch.equal(eager.sequences, graph.sequences)
        for a, b in zip(eager.logits, graph.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        return
    runs = []
    for graph in (False, True):
        cache = sparse_hf.build_cache("h2o", model.config, dict(KNOBS, cuda_graph=False))
        plain = torch.randint(1, 100, (2, 45), generator=torch.Generator().manual_seed(3)).cuda()
        cache.prefill_target = plain.shape[1]
        sparse_hf.prepare_model(model)
        with torch.inference_mode():
            token = model(input_ids=plain, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens, decoder = decode_greedy(model, cache, token, plain.shape[1], steps, graph)
        runs.append(tokens)
        if graph:
            assert decoder.captures >= 1
    assert torch.equal(runs[0], runs[1])
