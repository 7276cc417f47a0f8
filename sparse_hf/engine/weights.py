"""Weights into an :class:`~.model.EngineModel`: from HF safetensors (sharded or not) or an in-memory model.

HF names map onto the engine's fused parameters: ``q_proj``/``k_proj``/``v_proj`` are the three row blocks of
``qkv_proj``, ``gate_proj``/``up_proj`` the two of ``gate_up_proj``; every other name maps one to one.

Under tensor parallelism (``model.tp``) each rank copies its share of each full checkpoint tensor
(:func:`rank_share`): rows of the q/k/v and gate/up blocks (column-parallel), columns of ``o_proj`` and
``down_proj`` (row-parallel); everything else is replicated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch

#: HF projection name -> (engine parameter, block index in the fused weight).
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def safetensors_files(path: str) -> list[str]:
    """The ``*.safetensors`` files of a model directory (via ``model.safetensors.index.json`` when sharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}; save the model with save_pretrained(..., "
                                "safe_serialization=True)")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _block_slices(param_name: str, model) -> dict[int, slice]:
    """Row ranges of each block of this rank's fused weight (``qkv_proj``: q, k, v; ``gate_up_proj``: gate, up)."""
    if param_name == "qkv_proj":
        q = model.num_heads * model.head_dim
        kv = model.num_kv_heads * model.head_dim
        return {0: slice(0, q), 1: slice(q, q + kv), 2: slice(q + kv, q + 2 * kv)}
    tp = getattr(model, "tp", None)
    inter = model.config.intermediate_size // (tp.size if tp is not None else 1)       # this rank's columns
    return {0: slice(0, inter), 1: slice(inter, 2 * inter)}


#: Row-parallel weights: their input columns are split across ranks.
ROW_PARALLEL = (".o_proj.weight", ".down_proj.weight")


def rank_share(model, name: str, tensor: torch.Tensor, packed: bool) -> torch.Tensor:
    """The part of full checkpoint ``tensor`` (engine parameter ``name``; ``packed``: one block of a fused
    projection) that this rank of ``model.tp`` holds; the whole tensor without tensor parallelism."""
    tp = getattr(model, "tp", None)
    if tp is None or tp.size == 1:
        return tensor
    if packed:
        return tensor[tp.shard(tensor.shape[0])]
    if name.endswith(ROW_PARALLEL):
        return tensor[:, tp.shard(tensor.shape[1])]
    return tensor


@torch.no_grad()
def load_weights(model, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named ``tensors`` into ``model`` (cast to its dtype); every engine parameter must be filled."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    expected = {name: 1 for name in params}
    for name, p in params.items():
        if ".qkv_proj." in name:
            expected[name] = 3
        elif ".gate_up_proj." in name:
            expected[name] = 2
    for hf_name, tensor in tensors:
        name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and model.tied:
            continue
        target, block = name, None
        for hf_proj, (fused, index) in PACKED.items():
            if f".{hf_proj}." in name:
                target, block = name.replace(f".{hf_proj}.", f".{fused}."), index
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the engine's {model.family} model")
        param = params[target]
        dst = param if block is None else param[_block_slices(target.split(".")[-2], model)[block]]
        tensor = rank_share(model, target, tensor, block is not None)
        if dst.shape != tensor.shape:
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != engine shape {tuple(dst.shape)}")
        dst.copy_(tensor.to(dtype=param.dtype))
        filled[target] = filled.get(target, 0) + 1
    missing = [n for n, count in expected.items() if filled.get(n, 0) < count]
    if missing:
        raise ValueError(f"the checkpoint lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


@torch.no_grad()
def init_random_weights(model, std: float = 0.02, seed: int = 0) -> None:
    """Random weights (normal, ``std``; norms at 1) for benchmarks of a model shape without a checkpoint.

    Under tensor parallelism every rank draws the full tensors (the same ones as one rank would) and keeps its
    share, so a TP=N engine holds the TP=1 engine's weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(_full_random(model, name, p, std, gen))


def _full_random(model, name: str, param: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """A random draw of ``name``'s full (unsharded) tensor, cut to this rank's share of it."""
    tp = getattr(model, "tp", None)
    if tp is None or tp.size == 1:
        return torch.empty_like(param).normal_(0.0, std, generator=gen)
    fused = name.split(".")[-2]
    if fused in ("qkv_proj", "gate_up_proj"):                    # one draw of the whole fused [q; k; v] weight
        sizes = [(b.stop - b.start) * tp.size for b in _block_slices(fused, model).values()]
        full = torch.empty(sum(sizes), *param.shape[1:], dtype=param.dtype, device=param.device)
        full.normal_(0.0, std, generator=gen)
        return torch.cat([rank_share(model, name, block, packed=True) for block in full.split(sizes)])
    if name.endswith(ROW_PARALLEL):
        full = torch.empty(param.shape[0], param.shape[1] * tp.size, dtype=param.dtype, device=param.device)
        return rank_share(model, name, full.normal_(0.0, std, generator=gen), packed=False)
    return torch.empty_like(param).normal_(0.0, std, generator=gen)
