"""The compressors that ship with the package, one per embedded model: ``"demo"`` (SmolLM2-135M-Instruct) and
``"qwen-coder"`` (Qwen2.5-Coder-0.5B-Instruct).

``deltakv_path=NAME`` (and ``DeltaKVCompressor.from_pretrained(NAME)``) resolve to the directory that
:data:`SHIPPED_COMPRESSORS` gives for ``NAME``, so ``sparse-hf generate --model NAME --method deltakv`` works
offline on a fresh install. Each name is also the ``--model`` name of the model it was trained for.

- ``"demo"``: a linear latent-128 compressor trained 150 steps on an H200 from the PCA of the residuals
  ``x - ref`` with the K and V halves at equal variance (``--init pca --pca_balance kv``), on Jane Austen's novels;
  it records the filter layers ``[0, 1, 2, 3, 8, 17, 22]`` as its serving default (until 2026-12-04 run Z: the same
  recipe at latent 96).
- ``"qwen-coder"``: a linear latent-64 compressor trained 150 steps on an H200 (a short run) from the same kind of
  init, on the same text; it records the filter layers ``[0, 4, 9, 10, 16, 17, 21]`` (``sparse-hf calibrate
  --deltakv-path``).

Each directory holds config.json, model.safetensors (float16) and a README.md model card that says how the
compressor was made and what was measured.
"""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).parent / "assets"

#: Name -> directory of each shipped compressor (config.json, model.safetensors in float16, README.md model card).
#: The names are the ``load_model`` / ``--model`` names of the models they fit.
SHIPPED_COMPRESSORS = {
    "demo": _ASSETS / "smollm2-135m-deltakv-128",
    "qwen-coder": _ASSETS / "qwen2.5-coder-0.5b-deltakv-64",
}

#: Directory of the demo model's compressor.
DEMO_COMPRESSOR_DIR = SHIPPED_COMPRESSORS["demo"]


def resolve_compressor_path(path):
    """A shipped compressor's name (``"demo"``, ``"qwen-coder"``) -> its directory; any other path or Hub id
    unchanged."""
    shipped = SHIPPED_COMPRESSORS.get(str(path))
    return str(shipped) if shipped is not None else path


def recorded_filter_layers(path) -> list[int] | None:
    """The filter layers a local compressor folder (or shipped name) records as its serving default
    (``full_attn_layers`` in its config.json, written by ``sparse-hf calibrate --deltakv-path ... --save-compressor``),
    or ``None``: none recorded, a reference-format checkpoint, or not a local folder (a Hub id is not fetched here).
    The eval writes them into each prediction's ``cache_config``, so that predictions made with other layers are
    never resumed as these."""
    import json   # read here, not through reference_format: this module stays free of transformers (the core layer)

    config = Path(resolve_compressor_path(path)).expanduser() / "config.json"
    if not config.is_file():
        return None
    with open(config, encoding="utf-8") as f:
        record = json.load(f)
    return record.get("full_attn_layers") if record.get("model_type") == "deltakv_compressor" else None
