"""``sparse-hf calibrate --deltakv-path``: DeltaKV's per-layer compression sensitivity.

The probe compresses one layer at a time with every token rebuilt, so (1) a compressor that rebuilds exactly
(identity projections, latent = K/V width) leaves the output unchanged in every layer, (2) a layer whose rebuild is
made bad stands out and is pinned as a filter layer, and (3) the KL is the one a plain per-step loop over the
same caches computes. The CLI's one-line errors for these flags are in ``test_calibrate.py``."""

import json

import pytest
import torch
from transformers import DynamicCache

import sparse_hf  # noqa: F401
from helpers import saved_tiny_llama
from sparse_hf.calibrate import calibrate
from sparse_hf.calibrate_deltakv import PROBE_KNOBS, compression_sensitivity, most_sensitive
from sparse_hf.cli import main
from sparse_hf.deltakv import DeltaKVCompressor

LAYERS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("tiny"), LAYERS)


def prompt(n=220, seed=1):
    return torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(seed))


def spoiled(model, layer, scale=30.0, seed=0):
    """A random compressor whose ``layer`` rebuilds ``scale`` times too large."""
    torch.manual_seed(seed)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    with torch.no_grad():
        for p in comp.projections.layers[str(layer)].up.parameters():
            p.mul_(scale)
    return comp


def test_exact_rebuild_has_no_sensitivity(saved):
    _, model = saved
    kv_dim = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=kv_dim)
    with torch.no_grad():
        for layer in comp.projections.layers.values():
            for proj in (layer.down, layer.up):
                proj.weight.copy_(torch.eye(kv_dim))
                if proj.bias is not None:
                    proj.bias.zero_()
    sens = compression_sensitivity(model, [prompt()], comp, window=6, progress=False)
    assert set(sens) == set(range(1, LAYERS))
    assert max(sens.values()) < 1e-6, sens


def test_a_spoiled_layer_stands_out_and_is_pinned(saved):
    _, model = saved
    comp = spoiled(model, 2)
    sens = compression_sensitivity(model, [prompt(), prompt(seed=2)], comp, window=6, progress=False)
    assert most_sensitive(sens, 1) == [2] and sens[2] > 5 * max(sens[1], sens[3]), sens
    result = calibrate(model, [prompt(seed=3)], window=6, num_filter_layers=2, deltakv_compressor=comp)
    assert result["pinned"] == [0, 2] and result["full_attn_layers"] == [0, 2]
    assert result["per_layer"][2]["deltakv_kl"] == pytest.approx(result["deltakv_sensitivity"]["2"])


def test_kl_equals_a_plain_loop(saved):
    """The probe's number for one layer against a loop written out here: full vs only-that-layer-compressed
    DeltaKV cache, the same teacher-forced tail, KL(full || compressed) per step, averaged."""
    from sparse_hf.hf import build_cache, prepare_model

    _, model = saved
    comp = spoiled(model, 1, scale=3.0)
    ids, window, layer = prompt(230, seed=4), 5, 1
    got = compression_sensitivity(model, [ids], comp, window=window, layers=[layer], progress=False)[layer]
    prepare_model(model)

    def run(cache):
        rows = []
        with torch.no_grad():
            out = model(ids[:, :-window], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].double().log_softmax(-1))
            for t in range(window - 1):
                out = model(ids[:, -window + t:-window + t + 1], past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1].double().log_softmax(-1))
        return rows

    knobs = dict(PROBE_KNOBS, full_attn_layers=[i for i in range(LAYERS) if i != layer], compressor=comp)
    full, comp_rows = run(DynamicCache(config=model.config)), run(build_cache("deltakv", model.config, knobs))
    expected = sum(float((f.exp() * (f - c)).sum()) for f, c in zip(full, comp_rows)) / window
    assert expected > 1e-5 and got == pytest.approx(expected, rel=1e-3)


def test_cli_pins_the_sensitive_layer(saved, tmp_path, capsys):
    path, model = saved
    comp_dir = tmp_path / "comp"
    spoiled(model, 3).save_pretrained(comp_dir)
    out = tmp_path / "calib.json"
    rc = main(["calibrate", "--model", str(path), "--output", str(out), "--num-prompts", "1", "--length", "200",
               "--window", "6", "--num-filter-layers", "2", "--tasks", "niah_multikey",
               "--deltakv-path", str(comp_dir), "--save-compressor", str(tmp_path / "calibrated")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "deltakv KL when compressed alone" in captured.out and "(pinned)" in captured.out
    assert json.loads(out.read_text())["full_attn_layers"] == [0, 3]
    details = json.loads((tmp_path / "calib.agreement.json").read_text())
    assert set(details["deltakv_sensitivity"]) == {"1", "2", "3"} and details["pinned"] == [0, 3]
    # --save-compressor: the same weights, with the chosen layers as its serving default and in its card
    saved_comp = DeltaKVCompressor.from_pretrained(tmp_path / "calibrated")
    assert saved_comp.config.full_attn_layers == [0, 3]
    assert saved_comp.projections.serving_defaults()["full_attn_layers"] == (0, 3)
    assert "| filter layers (serving default) | 0, 3 |" in (tmp_path / "calibrated" / "README.md").read_text()
    original = DeltaKVCompressor.from_pretrained(comp_dir).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in saved_comp.state_dict().items())


def test_a_prompt_too_short_to_probe_is_a_clear_error(saved):
    _, model = saved
    comp = spoiled(model, 1)
    with pytest.raises(ValueError, match="too short to probe"):
        compression_sensitivity(model, [prompt(130)], comp, window=6, progress=False)
