"""Reference-format DeltaKV checkpoints keep their neighbour count: every layout the reference trainers wrote
(``seq_chunk_size`` in the seed era, ``k_neighbors`` / ``deltakv_k_neighbors`` in older configs, and ours) maps to
the training record that DeltaKV serving reads for its ``deltakv_neighbor_count`` default; none found warns."""

import warnings

import pytest
from test_deltakv_compressor import TINY, _reference_checkpoint
from transformers import Qwen2Config

from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.methods.deltakv import DeltaKV

LAYOUTS = [
    ({"seq_chunk_size": 4}, 4),                                    # seed-era trainer (the reference recipe)
    ({"k_neighbors": 3}, 3),                                       # older configs
    ({"deltakv_k_neighbors": 2}, 2),
    ({"deltakv_neighbor_count": 5, "seq_chunk_size": 4}, 5),        # ours wins over the seed-era field
    ({"deltakv_k_neighbors": 6, "seq_chunk_size": None}, 6),       # a null field counts as absent
]


@pytest.mark.parametrize("fields,expected", LAYOUTS)
def test_neighbour_count_reaches_the_serving_default(tmp_path, fields, expected):
    _reference_checkpoint(tmp_path, "linear", dict(fields, kv_compressed_size=12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                             # a recorded count loads without a warning
        comp = DeltaKVCompressor.from_pretrained(tmp_path)
    assert comp.config.training["neighbor_count"] == expected
    assert comp.projections.serving_defaults()["deltakv_neighbor_count"] == expected
    # what the DeltaKV cache does with it: the compressor's value unless the caller set the knob
    method_config = DeltaKV.config_class(full_attn_layers="0")
    served = DeltaKV.with_compressor_defaults(method_config, comp.projections.serving_defaults(), set())
    assert served.deltakv_neighbor_count == expected
    mine = DeltaKV.with_compressor_defaults(method_config.replace(deltakv_neighbor_count=1),
                                            comp.projections.serving_defaults(), {"deltakv_neighbor_count"})
    assert mine.deltakv_neighbor_count == 1
    comp.save_pretrained(tmp_path / "native")                      # converted to ours, the count survives
    assert DeltaKVCompressor.from_pretrained(tmp_path / "native").config.training["neighbor_count"] == expected


def test_no_neighbour_count_warns_and_serving_falls_back_to_one(tmp_path):
    _reference_checkpoint(tmp_path, "linear", {"kv_compressed_size": 12})
    with pytest.warns(UserWarning, match="no neighbour count.*seq_chunk_size"):
        comp = DeltaKVCompressor.from_pretrained(tmp_path)
    assert "neighbor_count" not in (comp.config.training or {})
    served = DeltaKV.with_compressor_defaults(DeltaKV.config_class(full_attn_layers="0"),
                                              comp.projections.serving_defaults(), set())
    assert served.deltakv_neighbor_count == 1
    comp.check_compatible(Qwen2Config(**TINY))


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_bad_neighbour_count_is_an_error_naming_the_field(tmp_path, bad):
    _reference_checkpoint(tmp_path, "linear", {"kv_compressed_size": 12, "seq_chunk_size": bad})
    with pytest.raises(ValueError, match="seq_chunk_size"):
        DeltaKVCompressor.from_pretrained(tmp_path)
