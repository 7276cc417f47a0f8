"""Finding compressor checkpoints, and reading the ones written by the reference DeltaKV trainer.

The reference format is a directory with the **base model's** config.json (plus DeltaKV fields such as
``kv_compressed_size``, ``compressor_down_type``) and ``model.safetensors`` (or a sharded index) holding
``model.layers.{i}.self_attn.compress_{down,up}.*`` tensors: ``.weight/.bias`` for linear, ``.0.*/.2.*`` for
Linear-GELU-Linear and ``.w12.weight/.w3.weight`` for SwiGLU. Tensor shapes are the truth; config fields that are
present are cross-checked against them, and missing ones are inferred.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from typing import Any

import torch

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.compress_(down|up)\.(.+)$")
_SHARED_KEY = re.compile(r"^(?:.*\.)?compress_(down|up)\.(.+)$")
_SPLIT_KEY = re.compile(r"(?:^|\.)[kv]_compress_(down|up)\.")

#: Config fields that hold the number of nearest centers a token's reference averages, in order of preference:
#: ours (and the current reference trainer's), older reference configs, and the seed-era trainer (which called it
#: ``seq_chunk_size``; 4 in the reference recipe).
NEIGHBOR_COUNT_FIELDS = ("deltakv_neighbor_count", "deltakv_k_neighbors", "k_neighbors", "seq_chunk_size")


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, kwargs: dict) -> str:
    """A local directory for ``name_or_path``: the directory itself, or a Hub snapshot of the repo id.

    A path that looks local (absolute, ``./``, ``~`` or several slashes) and does not exist raises
    FileNotFoundError without touching the network; a failed Hub download raises OSError saying both options.
    """
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file; a DeltaKV compressor is a directory (config.json + "
                                 "model.safetensors) written by save_pretrained or the reference trainer")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    if looks_local:
        raise FileNotFoundError(f"DeltaKV compressor checkpoint {path} does not exist; pass a directory written by "
                                "DeltaKVCompressor.save_pretrained (or the reference trainer) or a Hub id 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=path, revision=kwargs.get("revision"), token=kwargs.get("token"),
                                 cache_dir=kwargs.get("cache_dir"),
                                 local_files_only=bool(kwargs.get("local_files_only", False)),
                                 allow_patterns=["*.json", "*.safetensors", "*.md"])
    except Exception as err:  # network, auth, missing repo: one clear message
        raise OSError(f"could not load DeltaKV compressor {path!r}: it is not a local directory, and downloading it "
                      f"from the Hugging Face Hub failed ({type(err).__name__}: {err})") from err


def _read_config(local: str) -> dict:
    path = os.path.join(local, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{local} has no config.json; it is not a DeltaKV compressor checkpoint")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_native_checkpoint(local: str) -> bool:
    """True for a directory written by ``DeltaKVCompressor.save_pretrained``."""
    return _read_config(local).get("model_type") == "deltakv_compressor"


def _weight_files(local: str) -> list[str]:
    single = os.path.join(local, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(local, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted({os.path.join(local, v) for v in json.load(f)["weight_map"].values()})
    raise FileNotFoundError(f"{local} has neither model.safetensors nor model.safetensors.index.json")


def _compressor_tensors(local: str) -> dict[str, torch.Tensor]:
    """Only the ``compress_*`` tensors of the checkpoint (a full-model checkpoint is fine too)."""
    from safetensors import safe_open

    out = {}
    for file in _weight_files(local):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if "compress_" in key:
                    out[key] = f.get_tensor(key)
    return out


def _infer_projection(params: dict[str, torch.Tensor], where: str) -> tuple[str, int, int, int | None]:
    """``(type, in_size, out_size, hidden or None)`` of one projection from its tensors' names and shapes."""
    if "w12.weight" in params and "w3.weight" in params:
        w12, w3 = params["w12.weight"], params["w3.weight"]
        return "mlp_swiglu", w12.shape[1], w3.shape[0], w12.shape[0] // 2
    if "0.weight" in params and "2.weight" in params:
        return "mlp_gelu", params["0.weight"].shape[1], params["2.weight"].shape[0], params["0.weight"].shape[0]
    if set(params) <= {"weight", "bias"} and "weight" in params:
        return "linear", params["weight"].shape[1], params["weight"].shape[0], None
    raise ValueError(f"cannot tell the projection type of {where} from its tensors {sorted(params)}; expected "
                     "linear (.weight/.bias), mlp_gelu (.0.*/.2.*) or mlp_swiglu (.w12.weight/.w3.weight)")


def _declared_type(cfg: dict, direction: str) -> str | None:
    """The type the reference config declares for ``direction`` ('auto' resolved), or None when it says nothing."""
    from sparse_hf.deltakv.projections import normalize_projection_type

    kind = cfg.get(f"compressor_{direction}_type")
    if kind not in (None, "", "auto"):
        return normalize_projection_type(kind)
    if "use_nonlinear_compressor" in cfg:
        return "mlp_gelu" if cfg["use_nonlinear_compressor"] else "linear"
    return None


def reference_neighbor_count(cfg: dict, where: str = "config.json") -> int | None:
    """The neighbour count a reference-format ``cfg`` records (see :data:`NEIGHBOR_COUNT_FIELDS`), or ``None``
    with a warning when it records none (serving then falls back to 1 neighbour, which may not match training).

    The first field present wins; a value that is not an int >= 1 raises ``ValueError`` naming the field."""
    for field in NEIGHBOR_COUNT_FIELDS:
        if cfg.get(field) is None:
            continue
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {field}={value!r} is not a neighbour count (expected an int >= 1)")
        return value
    warnings.warn(f"{where}: the checkpoint records no neighbour count (none of {', '.join(NEIGHBOR_COUNT_FIELDS)}); "
                  "serving uses deltakv_neighbor_count=1 unless you pass it. Pass the value the compressor was "
                  "trained with (the reference recipe uses 4) in cache_config", UserWarning, stacklevel=3)
    return None


def load_reference_checkpoint(cls: type, local: str, dtype: Any = None) -> Any:
    """Build a ``cls`` (DeltaKVCompressor) from a reference-format directory; errors name what does not fit."""
    from sparse_hf.deltakv.compressor import DeltaKVCompressorConfig, model_kv_shape
    from transformers import AutoConfig

    cfg = _read_config(local)
    if cfg.get("split_kv"):
        raise ValueError(f"{local}: split_kv checkpoints (separate K and V compressors) are not supported")
    tensors = _compressor_tensors(local)
    if any(_SPLIT_KEY.search(k) for k in tensors):
        raise ValueError(f"{local}: split_kv checkpoints (k_/v_compress_* tensors) are not supported")
    if not tensors:
        raise ValueError(f"{local}: config.json has model_type {cfg.get('model_type')!r} and the weights hold no "
                         "compress_down/compress_up tensors; this is not a DeltaKV compressor checkpoint")
    base = AutoConfig.for_model(**cfg) if "model_type" in cfg else None
    if base is None:
        raise ValueError(f"{local}/config.json has no model_type; cannot read the base model's KV shape")
    layers, kv_heads, head_dim = model_kv_shape(base)

    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = defaultdict(dict)
    shared: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if m := _LAYER_KEY.match(key):
            grouped[(int(m.group(1)), m.group(2))][m.group(3)] = value
        elif m := _SHARED_KEY.match(key):  # the engine broadcasts layer-less keys to every layer
            shared[m.group(1)][m.group(2)] = value
    layer_ids = sorted({i for i, _ in grouped}) or list(range(layers))
    for direction, params in shared.items():
        for i in layer_ids:
            grouped[(i, direction)].update(params)

    shapes = {}
    for direction in ("down", "up"):
        found = {_infer_projection(grouped[(i, direction)], f"layer {i} compress_{direction}") for i in layer_ids}
        if len(found) != 1:
            raise ValueError(f"{local}: compress_{direction} differs between layers ({sorted(found)}); "
                             "one projection shape per checkpoint is supported")
        shapes[direction] = found.pop()
        declared = _declared_type(cfg, direction)
        if declared is not None and declared != shapes[direction][0]:
            raise ValueError(f"{local}: config.json declares a {declared} compress_{direction} but the tensors are "
                             f"{shapes[direction][0]}")
    d = 2 * kv_heads * head_dim
    (down_t, d_in, latent, down_h), (up_t, up_in, up_out, up_h) = shapes["down"], shapes["up"]
    if d_in != d or up_out != d or up_in != latent:
        raise ValueError(f"{local}: compressor maps {d_in} -> {latent} -> {up_out}, but the base model's "
                         f"concat(K, V) width is 2*{kv_heads}*{head_dim} = {d}")
    if "kv_compressed_size" in cfg and int(cfg["kv_compressed_size"]) != latent:
        raise ValueError(f"{local}: kv_compressed_size={cfg['kv_compressed_size']} but the tensors give {latent}")
    if max(layer_ids) >= layers:
        raise ValueError(f"{local}: tensors for layer {max(layer_ids)} but the base model has {layers} layers")

    biased = {any(k.endswith("bias") for k in grouped[(i, d)]) for i in layer_ids for d in ("down", "up")}
    if len(biased) != 1:
        raise ValueError(f"{local}: some projections have a bias and some do not; one bias flag is supported")
    names = {"cluster_ratio": "cluster_ratio", "cluster_metric": "metric"}
    knobs = {ours: cfg[theirs] for theirs, ours in names.items() if theirs in cfg}  # same keys as our trainer writes
    neighbors = reference_neighbor_count(cfg, local)
    if neighbors is not None:
        knobs["neighbor_count"] = neighbors
    config = DeltaKVCompressorConfig(
        num_hidden_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim, kv_compressed_size=latent,
        down_type=down_t, up_type=up_t, down_intermediate_size=down_h, up_intermediate_size=up_h,
        bias=biased.pop(),
        compressed_layers=None if layer_ids == list(range(layers)) else layer_ids,
        base_model=cfg.get("_name_or_path") or None, training=knobs or None)
    model = cls(config)
    state = {f"layers.{i}.{direction}.{suffix}": value
             for (i, direction), params in grouped.items() for suffix, value in params.items()}
    model.load_state_dict(state, strict=True)
    if dtype in (None, "auto"):
        dtype = next(iter(tensors.values())).dtype
    return model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
