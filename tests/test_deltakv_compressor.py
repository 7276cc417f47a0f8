"""DeltaKV compressor: the math against naive references, the HF conventions, the reference checkpoint format."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

import sparse_hf
from sparse_hf.deltakv import (
    DeltaKVCompressor,
    center_mask,
    cluster_reconstruct,
    compress,
    nearest_centers,
    reconstruct,
    reference_from_fathers,
)
from sparse_hf.deltakv.model_card import TEMPLATE
from sparse_hf.trainer.recon_forward import ReconstructedKV

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128)
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
D = 2 * 2 * 16  # 2 * kv heads * head_dim of TINY



def tiny_model(arch="llama", attn="sdpa"):
    torch.manual_seed(0)
    cfg = ARCHS[arch](**TINY)
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg).eval()


# -- clustering math ------------------------------------------------------------------------------------------------
def test_center_mask_matches_loop():
    pos = torch.arange(60)
    got = center_mask(pos, num_sink=16, cluster_ratio=0.1)
    want = [p < 16 or (p - 16) % 10 == 0 for p in range(60)]
    assert got.tolist() == want
    assert center_mask(pos, 4, 0.3).sum().item() == 4 + len(range(4, 60, 3))  # step = int(1 / 0.3) = 3


def _naive_fathers(x, c, tp, cp, k, metric, valid):
    b, n, m = x.shape[0], x.shape[1], c.shape[1]
    out = torch.full((b, n, k), -1, dtype=torch.long)
    for bi in range(b):
        for i in range(n):
            scored = []
            for j in range(m):
                if cp[bi, j] > tp[bi, i] or (valid is not None and not valid[bi, j]):
                    continue
                if metric == "l2":
                    s = -float(((x[bi, i] - c[bi, j]) ** 2).sum())
                elif metric == "dot":
                    s = float(x[bi, i] @ c[bi, j])
                else:
                    s = float(x[bi, i] @ c[bi, j] / (x[bi, i].norm() * c[bi, j].norm()))
                scored.append((s, j))
            for slot, (_, j) in enumerate(sorted(scored, reverse=True)[:k]):
                out[bi, i, slot] = j
    return out


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_nearest_centers_and_mean_match_naive_float64(metric):
    torch.manual_seed(1)
    x, c = torch.randn(2, 30, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    tp = torch.arange(30).expand(2, 30)
    cp = torch.tensor([[0, 1, 2, 5, 10, 20, 29], [0, 3, 6, 9, 12, 15, 18]])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 2] = False
    for k in (1, 3):
        got = nearest_centers(x, c, tp, cp, k, metric, center_valid=valid)
        assert torch.equal(got, _naive_fathers(x, c, tp, cp, k, metric, valid))
    ref = reference_from_fathers(c, got)
    for bi in range(2):
        for i in range(30):
            ids = [j for j in got[bi, i].tolist() if j >= 0]
            assert torch.allclose(ref[bi, i], c[bi, ids].mean(0), atol=1e-12)
    assert (got[:, 0] >= 0).sum(-1).tolist() == [1, 1]  # token 0 sees only the center at position 0


def test_no_visible_center_gives_zero_reference():
    c = torch.randn(1, 2, 4)
    ids = nearest_centers(torch.randn(1, 1, 4), c, torch.tensor([[0]]), torch.tensor([[3, 4]]), k=2)
    assert ids.tolist() == [[[-1, -1]]]
    assert torch.equal(reference_from_fathers(c, ids), torch.zeros(1, 1, 4))
    one = nearest_centers(torch.randn(1, 1, 4), c, torch.tensor([[0]]), torch.tensor([[3, 4]]), k=1)   # the max path
    assert one.tolist() == [[[-1]]]


@pytest.mark.parametrize("down,up", [("linear", "linear"), ("mlp_gelu", "mlp_swiglu"), ("mlp_swiglu", "linear")])
def test_compress_and_reconstruct_are_the_delta_formulas(down, up):
    comp = DeltaKVCompressor.for_model(LlamaConfig(**TINY), kv_compressed_size=8, down_type=down, up_type=up,
                                       intermediate_size=24).double()
    x, ref = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    latent = compress(x, ref, comp, 1)
    assert latent.shape == (2, 5, 8)
    assert torch.allclose(latent, comp.down(1, x) - comp.down(1, ref))
    assert torch.allclose(reconstruct(latent, ref, comp, 1), comp.up(1, latent) + ref)


def test_identity_compressor_reconstructs_exactly():
    comp = DeltaKVCompressor.identity_for(LlamaConfig(**TINY)).double()
    assert comp.config.kv_compressed_size == D and not comp.config.bias
    x, ref = torch.randn(3, 40, D, dtype=torch.float64), torch.randn(3, 40, D, dtype=torch.float64)
    latent = compress(x, ref, comp, 0)
    assert torch.equal(latent, x - ref)
    assert torch.allclose(reconstruct(latent, ref, comp, 0), x, rtol=0, atol=1e-13)
    assert torch.allclose(cluster_reconstruct(x, comp, 1, num_sink=4, cluster_ratio=0.25, k=2), x, atol=1e-13)


def test_cluster_reconstruct_keeps_sinks_and_matches_manual():
    comp = DeltaKVCompressor.for_model(LlamaConfig(**TINY), kv_compressed_size=8).double()
    x = torch.randn(2, 30, D, dtype=torch.float64)
    out = cluster_reconstruct(x, comp, 0, num_sink=16, cluster_ratio=0.1, k=2)
    assert torch.equal(out[:, :16], x[:, :16])
    centers = [*range(16), 16, 26]
    pos = torch.arange(30).expand(2, 30)
    fathers = nearest_centers(x[:, 16:], x[:, centers], pos[:, 16:], pos[:, centers], 2)
    ref = reference_from_fathers(x[:, centers], fathers)
    assert torch.allclose(out[:, 16:], comp.up(0, comp.down(0, x[:, 16:]) - comp.down(0, ref)) + ref)


# -- the reconstructed forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recon_forward_with_identity_equals_plain(arch, attn):
    model = tiny_model(arch, attn)
    ids = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        plain = model(ids).logits
        patch = ReconstructedKV(model, DeltaKVCompressor.identity_for(model.config), num_sink=4, neighbor_count=2)
        with patch:
            recon = model(ids).logits
            assert set(patch.layer_mse) == {0, 1} and patch.total_mse() < 1e-12
            patch.mode = "off"
            assert torch.equal(model(ids).logits, plain)  # the mirrored attention is bit-exact
        with ReconstructedKV(model, DeltaKVCompressor.for_model(model.config, kv_compressed_size=4)):
            lossy = model(ids).logits
        assert torch.equal(model(ids).logits, plain)  # forward restored on exit
    assert torch.allclose(recon, plain, atol=1e-5)
    assert (lossy - plain).abs().max() > 1e-3


def test_recon_forward_only_touches_compressed_layers():
    model = tiny_model()
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=4, compressed_layers=[1])
    with torch.no_grad(), ReconstructedKV(model, comp) as patch:
        model(torch.randint(0, 128, (1, 40)))
    assert set(patch.layer_mse) == {1}


# -- HF conventions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("down,up", [("linear", "linear"), ("mlp_gelu", "linear"), ("mlp_swiglu", "mlp_gelu")])
def test_save_load_round_trip_and_model_card(tmp_path, down, up):
    comp = DeltaKVCompressor.for_model(Qwen2Config(**TINY), kv_compressed_size=16, down_type=down, up_type=up,
                                       down_intermediate_size=48, base_model="Qwen/Qwen2.5-7B-Instruct")
    comp.save_pretrained(tmp_path, quality={"perplexity (DeltaKV)": 7.25}, training_data="my-corpus")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    loaded = DeltaKVCompressor.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == comp.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in comp.state_dict().items())
    x = torch.randn(3, D)
    assert torch.equal(loaded(x, 1), comp(x, 1))
    assert loaded.config.down_type == down and loaded.config.quality == {"perplexity (DeltaKV)": 7.25}
    card = (tmp_path / "README.md").read_text()
    for line in ("| latent width | 16 |", "| input width D = 2 * KV heads * head_dim | 64 |",
                 "| KV heads x head_dim | 2 x 16 |", "base_model: Qwen/Qwen2.5-7B-Instruct",
                 "| perplexity (DeltaKV) | 7.25 |", "| LongBench average | not measured |", "| data | my-corpus |"):
        assert line in card
    assert ("mlp_swiglu (hidden 48)" in card) == (down == "mlp_swiglu")


def test_template_file_is_the_canonical_template():
    path = os.path.join(os.path.dirname(__file__), "..", "model_cards", "deltakv_compressor.md")
    with open(path, encoding="utf-8") as f:
        assert f.read() == TEMPLATE


def test_push_to_hub_uploads_our_card(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": "me/" + repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            seen["repo"], seen["files"] = repo_id, sorted(os.listdir(folder_path))
            seen["card"] = open(os.path.join(folder_path, "README.md")).read()
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert DeltaKVCompressor.for_model(LlamaConfig(**TINY)).push_to_hub("deltakv-tiny") == "ok"
    assert seen["repo"] == "me/deltakv-tiny"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "library_name: sparse-hf" in seen["card"]


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    DeltaKVCompressor.for_model(LlamaConfig(**TINY), kv_compressed_size=8).save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(tmp_path))
    assert DeltaKVCompressor.from_pretrained("me/deltakv-tiny").config.kv_compressed_size == 8
    assert calls == ["me/deltakv-tiny"]


# -- reference checkpoint format ------------------------------------------------------------------------------------------
def _reference_checkpoint(path, kind, fields):
    """Write what the reference trainer writes: base config + DeltaKV fields, compress_* tensors."""
    torch.manual_seed(3)
    latent, h = 12, 20
    shapes = {"linear": {"weight": (latent, D), "bias": (latent,)},
              "mlp_gelu": {"0.weight": (h, D), "0.bias": (h,), "2.weight": (latent, h), "2.bias": (latent,)},
              "mlp_swiglu": {"w12.weight": (2 * h, D), "w3.weight": (latent, h)}}[kind]
    up = {"weight": (D, latent)} if kind == "mlp_swiglu" else {"weight": (D, latent), "bias": (D,)}  # recipe: no bias
    tensors = {"model.embed_tokens.weight": torch.randn(128, 64)}  # base weights may sit next to them
    for i in range(2):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.self_attn.compress_down.{name}"] = torch.randn(shape) * 0.1
        for name, shape in up.items():
            tensors[f"model.layers.{i}.self_attn.compress_up.{name}"] = torch.randn(shape) * 0.1
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = Qwen2Config(**TINY).to_dict()
    cfg.update(fields)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, default=str)
    return tensors


def _naive_down(t, i, kind, x):
    p = f"model.layers.{i}.self_attn.compress_down."
    if kind == "linear":
        return x @ t[p + "weight"].T + t[p + "bias"]
    if kind == "mlp_gelu":
        hid = torch.nn.functional.gelu(x @ t[p + "0.weight"].T + t[p + "0.bias"])
        return hid @ t[p + "2.weight"].T + t[p + "2.bias"]
    x1, x2 = (x @ t[p + "w12.weight"].T).chunk(2, -1)
    return (torch.nn.functional.silu(x1) * x2) @ t[p + "w3.weight"].T


@pytest.mark.parametrize("kind,fields", [
    ("linear", {"kv_compressed_size": 12, "use_nonlinear_compressor": False, "compressor_linear_bias": True}),
    ("mlp_gelu", {"kv_compressed_size": 12, "compressor_down_type": "auto", "use_nonlinear_compressor": True,
                  "compressor_up_type": "linear", "compressor_intermediate_size": 20}),
    ("mlp_swiglu", {"compressor_down_type": "mlp_swiglu", "compressor_up_type": "linear",
                    "compressor_down_intermediate_size": 20, "compressor_up_intermediate_size": -1}),
    ("mlp_swiglu", {}),  # nothing declared: everything inferred from tensor shapes
])
def test_reference_format_loads(tmp_path, kind, fields):
    tensors = _reference_checkpoint(tmp_path, kind, fields)
    comp = DeltaKVCompressor.from_pretrained(tmp_path)
    assert (comp.config.down_type, comp.config.up_type, comp.config.kv_compressed_size) == (kind, "linear", 12)
    assert comp.config.bias == (kind != "mlp_swiglu")
    comp.check_compatible(Qwen2Config(**TINY))
    x = torch.randn(4, D)
    for i in range(2):
        assert torch.allclose(comp.down(i, x), _naive_down(tensors, i, kind, x), atol=1e-6)
        up = f"model.layers.{i}.self_attn.compress_up."
        z = torch.randn(4, 12)
        bias = tensors.get(up + "bias", 0)
        assert torch.allclose(comp.up(i, z), z @ tensors[up + "weight"].T + bias, atol=1e-6)
    comp.save_pretrained(tmp_path / "native")  # and it converts to our format
    assert torch.equal(DeltaKVCompressor.from_pretrained(tmp_path / "native").down(1, x), comp.down(1, x))


def test_reference_format_declared_type_must_match_tensors(tmp_path):
    _reference_checkpoint(tmp_path, "linear", {"compressor_down_type": "mlp_swiglu"})
    with pytest.raises(ValueError, match="declares a mlp_swiglu compress_down but the tensors are linear"):
        DeltaKVCompressor.from_pretrained(tmp_path)


# -- bad input -------------------------------------------------------------------------------------------------------------
def test_mismatched_compressor_is_rejected():
    comp = DeltaKVCompressor.for_model(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="it has 2 layers but the model has 3"):
        comp.check_compatible(LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="it has 2 KV heads but the model has 4"):
        comp.check_compatible(LlamaConfig(**{**TINY, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match="head_dim is 16 but the model's is 32"):
        comp.check_compatible(LlamaConfig(**{**TINY, "head_dim": 32}))
    model = tiny_model("qwen3")
    bad = DeltaKVCompressor.for_model(Qwen3Config(**{**TINY, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="does not fit this model"):
        ReconstructedKV(model, bad)


def test_missing_path_and_unknown_type_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeltaKVCompressor.from_pretrained(str(tmp_path / "nope" / "compressor"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DeltaKVCompressor.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="not a local directory, and downloading it from the Hugging Face Hub failed"):
        DeltaKVCompressor.from_pretrained("nobody/no-such-compressor", local_files_only=True)
    with pytest.raises(ValueError, match="unknown compressor projection type 'conv'.*linear, mlp_gelu, mlp_swiglu"):
        DeltaKVCompressor.for_model(LlamaConfig(**TINY), down_type="conv")
    comp = DeltaKVCompressor.for_model(LlamaConfig(**TINY), compressed_layers=[0])
    with pytest.raises(ValueError, match="layer 1 has no compressor"):
        comp.down(1, torch.randn(2, D))
    with pytest.raises(ValueError, match="must have last dim 64"):
        comp.down(0, torch.randn(2, D + 1))


# -- the compressors that ship in the package ----------------------------------------------------------------------------
#: (layers, KV heads, head_dim, latent) of each shipped compressor: its model's KV shape and its latent width
SHIPPED = {"demo": (30, 3, 64, 128),         # SmolLM2-135M-Instruct
           "qwen-coder": (24, 2, 64, 64)}    # Qwen2.5-Coder-0.5B-Instruct
#: The filter layers each shipped compressor records as its serving default, and where they were measured
#: (docs/accuracy.md: "run W" for Qwen, "runs Y and Z" for the demo)
SHIPPED_FILTER_LAYERS = {"demo": [0, 1, 2, 3, 8, 17, 22], "qwen-coder": [0, 4, 9, 10, 16, 17, 21]}


def test_shipped_names_resolve_to_their_directories():
    from sparse_hf.deltakv.demo import DEMO_COMPRESSOR_DIR, SHIPPED_COMPRESSORS, resolve_compressor_path

    assert set(SHIPPED_COMPRESSORS) == set(SHIPPED) and DEMO_COMPRESSOR_DIR == SHIPPED_COMPRESSORS["demo"]
    for name, path in SHIPPED_COMPRESSORS.items():
        assert resolve_compressor_path(name) == str(path)
        assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    for other in ("org/compressor", "./demo", "qwen", "/tmp/qwen-coder"):
        assert resolve_compressor_path(other) == other


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_compressor_loads_offline_in_float16(name, monkeypatch):
    """``from_pretrained(name)`` reads the package's files (no Hub), shaped for its model, float16 and finite."""
    from safetensors import safe_open

    from sparse_hf.deltakv.demo import SHIPPED_COMPRESSORS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    comp = DeltaKVCompressor.from_pretrained(name)
    cfg = comp.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.kv_compressed_size) == SHIPPED[name]
    assert cfg.down_type == cfg.up_type == "linear" and cfg.compressed_layers is None and comp.dtype == torch.float16
    assert cfg.training["num_sink"] == 16 and cfg.quality["perplexity (DeltaKV)"] > 0
    assert sorted(comp.layers) == sorted(str(i) for i in range(cfg.num_hidden_layers))
    with safe_open(SHIPPED_COMPRESSORS[name] / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors.keys() == comp.state_dict().keys()
    for key, value in tensors.items():
        assert value.dtype == torch.float16 and torch.isfinite(value).all(), key
        assert torch.equal(comp.state_dict()[key], value)
    card = (SHIPPED_COMPRESSORS[name] / "README.md").read_text()
    assert f"base_model: {cfg.base_model}" in card and f'deltakv_path="{name}"' in card
    assert cfg.full_attn_layers == SHIPPED_FILTER_LAYERS[name] and str(cfg.full_attn_layers) in card


def test_qwen_coder_compressor_fits_the_converted_model_when_present():
    """Against the real model's config.json, where ``load_model("qwen-coder")`` already converted it (no download)."""
    from transformers import AutoConfig

    from sparse_hf.model_zoo import QWEN_CODER
    from sparse_hf.models import cache_dir

    folder = cache_dir() / QWEN_CODER.dirname
    if not (folder / "config.json").is_file():
        pytest.skip(f"qwen-coder not converted at {folder} (load_model('qwen-coder') makes it)")
    model_config = AutoConfig.from_pretrained(folder)
    comp = DeltaKVCompressor.from_pretrained("qwen-coder")
    comp.check_compatible(model_config)
    from sparse_hf.deltakv.compressor import model_kv_shape
    assert model_kv_shape(model_config) == SHIPPED["qwen-coder"][:3]


def _tiny_model_shaped_like(name):
    """A random tiny model with the KV shape of the model ``name``'s compressor was trained for (Qwen2 layers)."""
    layers, kv_heads, head_dim, _ = SHIPPED[name]
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=kv_heads * head_dim, num_hidden_layers=layers, num_attention_heads=kv_heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=64, vocab_size=128)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_compressor_compresses_and_rebuilds_in_a_deltakv_cache(name):
    """``deltakv_path=name`` in a DeltaKV cache on a model of its KV shape (the demo's passkey test's knobs, a
    random tiny model): tokens are compressed, the cache holds less than a full one, and a rebuild of every
    compressed token gives the cluster centers exactly and finite, compressor-made values for the others."""
    from sparse_hf.deltakv.state import all_offsets, rebuild

    model = _tiny_model_shaped_like(name)
    comp = DeltaKVCompressor.from_pretrained(name)
    layer_idx = 3                                        # a compressed layer (not in full_attn_layers)
    attn = model.model.layers[layer_idx].self_attn
    raw = {}
    hooks = [getattr(attn, p).register_forward_hook(lambda m, i, o, p=p: None if p in raw else raw.update({p: o}))
             for p in ("k_proj", "v_proj")]              # the prompt's pre-RoPE K and V (the first call)
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(0))   # no pad token (0)
    knobs = dict(deltakv_path=name, num_top_tokens=0.25, full_attn_layers="0,1,2,8,16", num_recent_tokens=16,
                 kv_quant_bits=8)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                             cache_implementation="deltakv", cache_config=knobs)
    for hook in hooks:
        hook.remove()
    assert out.sequences.shape == (1, 304)
    layer = out.past_key_values.layers[layer_idx]
    assert layer.compressed_per_row()[0] > 200
    assert sparse_hf.kv_usage(out.past_key_values).ratio < 0.75
    pick, ok = all_offsets(layer.state)
    x, pos = rebuild(layer.state, pick, comp.projections, layer_idx)
    x, pos = x[ok], pos[ok]
    assert torch.isfinite(x).all() and x.shape[-1] == comp.config.kv_dim
    truth = torch.cat([raw["k_proj"], raw["v_proj"]], -1)[0, pos]
    centers = (pick[ok] % layer.state.clustering.step) == 0
    assert 0 < centers.sum() < len(pos)
    torch.testing.assert_close(x[centers].float(), truth[centers], atol=1e-5, rtol=1e-5)  # K: inverse RoPE
    assert not torch.equal(x[~centers].float(), truth[~centers])     # the others are rebuilt, not stored
