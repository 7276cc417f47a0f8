"""The README.md model card that ``DeltaKVCompressor.save_pretrained`` writes.

The canonical template is :data:`TEMPLATE` below (``string.Template`` syntax); ``model_cards/deltakv_compressor.md``
in the repository is an identical copy for readers, and a test keeps the two equal. Rendering needs only the
compressor's config, so the card is always in sync with the weights next to it.
"""

from __future__ import annotations

import re
import string
from typing import Any

#: Quality fields every card lists; values come from ``config.quality`` (a dict the caller passes).
QUALITY_FIELDS = (
    "reconstruction MSE (held-out)",
    "perplexity (full KV)",
    "perplexity (DeltaKV)",
    "LongBench average",
    "needle-in-a-haystack accuracy",
)
NOT_MEASURED = "not measured"
#: The filter-layer row of a compressor without calibrated filter layers.
NOT_CALIBRATED = "not calibrated (the method's default; see `sparse-hf calibrate --deltakv-path`)"

TEMPLATE = """\
---
library_name: sparse-hf
tags:
- deltakv
- kv-cache-compression
- sparse-hf
$front_matter---

# DeltaKV compressor for $base_model

Per-layer KV-cache compressor for [DeltaKV](https://arxiv.org/abs/2602.08005), in the
sparse-hf format. For each old token, DeltaKV stores
`latent = down(x) - down(ref)` and rebuilds `x ~ up(latent) + ref`, where `x = concat(K, V)` over all KV heads
before RoPE (Qwen3: before `k_norm`) and `ref` is the mean of the token's nearest cluster centers.

## Dimensions

| field | value |
|---|---|
| base model | $base_model |
| compressed layers | $layers |
| KV heads x head_dim | $kv_heads x $head_dim |
| input width D = 2 * KV heads * head_dim | $kv_dim |
| latent width | $latent |
| latent / D | $ratio |
| down projection | $down |
| up projection | $up |
| bias | $bias |
| parameters | $num_parameters |
| filter layers (serving default) | $filter_layers |

## Training

| field | value |
|---|---|
| data | $training_data |
$training_rows
## Measured quality

| metric | value |
|---|---|
$quality_rows
## Usage

```python
from sparse_hf.deltakv import DeltaKVCompressor

compressor = DeltaKVCompressor.from_pretrained("PATH_OR_HUB_ID")
compressor.check_compatible(model.config)  # raises if it was trained for another KV shape
```
"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _projection(kind: str, hidden: int) -> str:
    return kind if kind == "linear" else f"{kind} (hidden {hidden})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_model_card(config: Any, num_parameters: int | None = None) -> str:
    """The README.md text for a :class:`DeltaKVCompressorConfig`; absent quality fields read "not measured"."""
    base = config.base_model or "an unspecified base model"
    front = ""
    if config.base_model and _HUB_ID.match(config.base_model):
        front += f"base_model: {config.base_model}\n"
    if config.training_data and _HUB_ID.match(str(config.training_data)):
        front += f"datasets:\n- {config.training_data}\n"
    layers = config.layer_indices
    n = config.num_hidden_layers
    layer_text = f"all {n}" if len(layers) == n else f"{len(layers)} of {n}: {', '.join(map(str, layers))}"
    quality = dict(config.quality or {})
    rows = [f"| {name} | {_fmt(quality.pop(name, NOT_MEASURED))} |" for name in QUALITY_FIELDS]
    rows += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in quality.items()]
    training = [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in (config.training or {}).items()]
    return string.Template(TEMPLATE).substitute(
        front_matter=front, base_model=base, layers=layer_text, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, kv_dim=config.kv_dim, latent=config.kv_compressed_size,
        ratio=f"{config.kv_compressed_size / config.kv_dim:.3f}",
        down=_projection(config.down_type, config.hidden_size_for("down")),
        up=_projection(config.up_type, config.hidden_size_for("up")), bias=config.bias,
        num_parameters="unknown" if num_parameters is None else f"{num_parameters:,}",
        filter_layers=(NOT_CALIBRATED if getattr(config, "full_attn_layers", None) is None
                       else ", ".join(map(str, config.full_attn_layers))),
        training_data=_fmt(config.training_data or NOT_MEASURED.replace("measured", "recorded")),
        training_rows="".join(r + "\n" for r in training), quality_rows="".join(r + "\n" for r in rows))
