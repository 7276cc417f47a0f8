"""DeltaKV decode driven the way :class:`GraphDecoder` drives it (replay while the buffer signature holds), emulated on
CPU: a CUDA-graph replay re-runs the captured kernels on the *addresses and shapes* they read at capture, so every
tensor a replayed step reads from outside the step must be the one the capture read. A tensor that the cache
re-allocates (a flush's new state tensors, per-flush column tables) without changing
:meth:`GraphDecoder._signature` is read stale by the replay: on the H200 this was a device-side assert ("scatter
gather kernel index out of bounds") in ``sparse-hf bench --methods deltakv+graph`` at 4096 x 8, where the
bench's decoder is not the cache's own ``graph_decoder``."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_hf.hf import cache as cache_module
from sparse_hf.hf import deltakv_cache, selection_cache
from sparse_hf.hf.cuda_graph import GraphDecoder
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from test_deltakv_static import _decoder


class _ExternalReads(TorchDispatchMode):
    """Records every tensor an op of the traced region reads that the region did not create itself, as
    ``(op, storage address, storage offset, shape, stride, dtype)``: what a captured CUDA graph bakes in. View ops
    are left out (they read no data)."""

    def __init__(self):
        super().__init__()
        self.reads = []
        self._made = set()      # storages allocated inside the region
        self._keep = []         # keep them alive, so no address is reused within the region

    @staticmethod
    def _storage(t):
        return t.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = {self._storage(t) for t in inputs}
        for t in inputs:
            # a view reads no data (no kernel in a graph, host metadata only); ops that may alias (``to``) are
            # views to the dispatcher, so their fresh outputs are still noted below
            if not func.is_view and self._storage(t) not in self._made:
                self.reads.append((str(func), self._storage(t), t.storage_offset(), tuple(t.shape),
                                   tuple(t.stride()), t.dtype))
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and self._storage(t) not in seen:
                self._made.add(self._storage(t))
                self._keep.append(t)
        return out


def _gpu_code_paths(monkeypatch):
    """Take the decode paths the GPU takes (fused kernels over whole buffers), with the kernels' torch references."""
    for module in (cache_module, selection_cache, deltakv_cache):
        monkeypatch.setattr(module, "kernels_run_fused", lambda t: True)


def _replay_like_graph_decoder(model, cache, steps, start_pos: torch.Tensor, token):
    """Steps decided as :meth:`GraphDecoder.step` decides them (eager / warm-up + capture / replay), run eagerly, with
    the external reads of each replayed step compared with the capture's (the first replay after it reads what the
    capture read: nothing runs between them). A replayed step runs as the capture ran it (``cache.capturing``: no
    eager bookkeeping inside), then :meth:`maintain_layer` as after a replay. Returns the replays and captures."""
    decoder = GraphDecoder(model, cache)     # not cache.graph_decoder: as the bench drives it
    ids, pos = token.clone(), torch.empty_like(token)
    signature = captured = None
    replays = captures = 0
    for i in range(steps):
        pos.copy_(start_pos + i)
        replay = decoder._room() and signature is not None and decoder._signature() == signature
        with torch.inference_mode():
            if replay:       # what a replay runs: the captured step (no eager work inside), then maintain_layer
                cache.capturing = True
                try:
                    with _ExternalReads() as rec:
                        logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
                finally:
                    cache.capturing = False
                for layer_idx in range(len(cache.layers)):
                    cache.maintain_layer(layer_idx)
                if captured is None:
                    captured = rec.reads
                else:
                    assert rec.reads == captured, f"step {i}: a replay would read tensors the capture did not " \
                        f"({sorted(set(rec.reads) ^ set(captured), key=str)[:4]})"
                replays += 1
            else:
                had_room = decoder._room()
                logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
                if had_room and decoder._room():      # GraphDecoder captures after a warm-up step with room
                    signature, captured = decoder._signature(), None
                    captures += 1
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return replays, captures


@pytest.mark.parametrize("budget,padded", [(6, False), (0.25, False), (0.25, True)])
def test_a_replay_reads_only_what_its_capture_read_across_flushes(budget, padded, monkeypatch):
    _gpu_code_paths(monkeypatch)
    model, cache, step = _decoder(budget=budget, padded=padded, layers=5 if padded else 4)
    for _ in range(2):
        step()
    layers = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    counts = [list(layer.state.counts) for layer in layers]
    # the next positions of each row (its columns minus its padding), as generate would pass them
    start = cache.layers[0].seen - torch.tensor(layers[0].pad).view(-1, 1)
    token = torch.randint(1, 100, (2, 1), generator=torch.Generator().manual_seed(5))
    replays, captures = _replay_like_graph_decoder(model, cache, 40, start, token)
    assert counts != [list(layer.state.counts) for layer in layers]     # raw buffers flushed in between
    assert replays >= 5 and captures >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [6, 0.25])
def test_a_graph_decoder_of_its_own_gives_eager_tokens(budget):
    """As ``sparse-hf bench --methods deltakv+graph`` drives it: a :class:`GraphDecoder` that is not the cache's own
    ``graph_decoder``, over flushes and scratch re-sizes, token for token the same as eager decode."""
    import sparse_hf
    from test_deltakv_static import _config
    from helpers import decode_greedy, tiny_model

    model = tiny_model("llama", layers=4).cuda()
    ids = torch.randint(1, 100, (3, 45), generator=torch.Generator().manual_seed(3)).cuda()
    cfg = _config(model, budget)
    cfg["compressor"] = cfg["compressor"].cuda()
    runs = []
    for graph in (False, True):
        cache = sparse_hf.build_cache("deltakv", model.config, dict(cfg, cuda_graph=False))
        cache.prefill_target = ids.shape[1]
        sparse_hf.prepare_model(model)
        with torch.inference_mode():
            token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens, decoder = decode_greedy(model, cache, token, ids.shape[1], 40, graph)
        runs.append(tokens)
        if graph:
            assert decoder.captures >= 3
    assert torch.equal(runs[0], runs[1])
