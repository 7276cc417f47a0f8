"""The compressor that ships with the package, for the demo model (SmolLM2-135M-Instruct).

``deltakv_path="demo"`` (and ``DeltaKVCompressor.from_pretrained("demo")``) resolve to it, so
``sparse-hf generate --model demo --method deltakv`` works offline on a fresh install. It is a linear latent-96
compressor trained 650 steps on an H200 from the PCA of the residuals ``x - ref`` (``--init pca``) on Jane Austen's
novels; its model card says how it was made and what was measured.
"""

from __future__ import annotations

from pathlib import Path

#: Directory of the shipped compressor (config.json, model.safetensors in float16, README.md model card).
DEMO_COMPRESSOR_DIR = Path(__file__).parent / "assets" / "smollm2-135m-deltakv-96"


def resolve_compressor_path(path):
    """``"demo"`` -> the shipped compressor's directory; any other path or Hub id unchanged."""
    return str(DEMO_COMPRESSOR_DIR) if str(path) == "demo" else path
