"""DeltaKV's byte accounting (``kv_usage``, ``DeltaKVLayer.bytes_by_part``) is honest: it equals the bytes of every
distinct tensor storage the cache's layers hold on the compute device (raw slots, scratch, latents, scales, centers,
father ids, positions, per-flush column tables), found by walking the layers' attributes, not by a formula."""

import pytest
import torch

from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.deltakv.quant import QuantizedLatent
from sparse_hf.hf.deltakv_layer import DeltaKVLayer, SharedScratch
from sparse_hf.usage import kv_usage
from helpers import greedy, left_padded_batch, tiny_model
from test_deltakv_static import KNOBS


def _storages(obj, seen_objs, out):
    """Every tensor storage reachable from ``obj`` through attributes, dicts, lists, tuples (``data_ptr`` ->
    ``nbytes``)."""
    if id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            out[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return
    if isinstance(obj, (list, tuple, QuantizedLatent)):
        for item in obj:
            _storages(item, seen_objs, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _storages(item, seen_objs, out)
    elif isinstance(obj, (DeltaKVLayer, SharedScratch)) or type(obj).__module__.startswith(("sparse_hf.hf.layer",
                                                                                           "sparse_hf.deltakv.state")):
        for name, item in vars(obj).items():
            if name not in ("clustering",):
                _storages(item, seen_objs, out)


@pytest.mark.parametrize("arch,bits,graph", [("qwen2", 4, True), ("qwen3", 8, True), ("llama", 0, False)])
def test_kv_bytes_equal_the_tensors_the_layers_hold(arch, bits, graph):
    model = tiny_model(arch, layers=4)
    ids, mask = left_padded_batch((50, 31))
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    cfg = dict(KNOBS, compressor=comp, num_top_tokens=6, kv_quant_bits=bits, cuda_graph=graph)
    out = greedy(model, ids, mask, new_tokens=12, cache_implementation="deltakv", cache_config=cfg,
                 return_dict_in_generate=True)
    cache = out.past_key_values
    held = {}
    visited = set()
    for layer in cache.layers:
        _storages(layer, visited, held)
    usage = kv_usage(cache)
    assert usage.bytes == sum(held.values())
    parts = {}
    for layer in cache.layers:
        if isinstance(layer, DeltaKVLayer):
            for name, n in layer.bytes_by_part().items():
                parts[name] = parts.get(name, 0) + n
    assert parts["latents"] > 0 and parts["father ids"] > 0 and parts["centers"] > 0
