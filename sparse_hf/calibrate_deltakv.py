"""DeltaKV's part of ``sparse-hf calibrate``: how much compressing each layer alone changes the model's output.

OmniKV's filter layers are chosen by how well one layer's top-k tokens stand for the next layers' (``calibrate``).
DeltaKV adds a second cost: every non-filter layer holds its tokens as latents and rebuilds them, and some layers
rebuild worse than others. On Qwen2.5-Coder-0.5B the set OmniKV's calibration chose scored 0.97 of the full cache
for OmniKV but 0.78 for DeltaKV, because it compressed layer 16: with every token rebuilt (no selection at all),
the sets that compressed layer 16 raised the answer loss by half, and those that kept it full matched the default layers
(`docs/accuracy.md`, CPU 2026-12-03 evening). So the sensitivity is measured directly, per layer:

for each calibration prompt, the first ``L - window`` tokens are prefilled and the last ``window`` tokens fed one
decode step at a time (teacher forcing), once with a full cache and once per layer ``l`` with a DeltaKV cache in
which only ``l`` is compressed and every compressed token is rebuilt each step (``num_top_tokens=1.0``). A layer's
sensitivity is the mean KL divergence ``KL(full || compressed)`` of the next-token distributions over those steps
and prompts. The ``pin`` most sensitive layers become filter layers (``choose_filter_layers(..., include=...)``),
and the agreement decides the rest.
"""

from __future__ import annotations

#: Knobs of the per-layer probe: the eval's sinks and recent window, every compressed token rebuilt each step.
PROBE_KNOBS = {"num_sink_tokens": 4, "num_recent_tokens": 64, "num_top_tokens": 1.0}


def _window_logprobs(model, head, tail, cache):
    """Log-probabilities ``[window, vocab]`` (float32) of the next token after ``head [1, P]`` and after each of
    ``tail [1, W]``'s tokens but the last, the tail fed one decode step at a time into ``cache``."""
    import inspect

    import torch

    # transformers 5.2x names the argument ``cache`` (``past_key_values`` warns there); 5.17 knows only the old name
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        logits = model(head, use_cache=True, **{name: cache}).logits[0, -1]
        for t in range(tail.shape[1]):
            out.append(torch.log_softmax(logits.float(), -1))
            if t + 1 < tail.shape[1]:
                logits = model(tail[:, t:t + 1], use_cache=True, **{name: cache}).logits[0, -1]
    return torch.stack(out)


def compression_sensitivity(model, prompts: list, compressor, window: int = 16, layers=None,
                            progress: bool = True) -> dict[int, float]:
    """Per layer, the mean ``KL(full || only this layer compressed)`` over the last ``window`` tokens of each
    prompt (token id tensors ``[1, L]``).

    Args:
        model: a supported HF causal LM (prepared for sparse-hf caches here).
        compressor: a ``DeltaKVCompressor`` (or a path/name ``deltakv_path`` accepts) for this model.
        layers: the layers to probe (default: every layer but 0, which is always a filter layer).

    Returns:
        ``{layer: mean KL}`` in nats per step, for each probed layer.
    """
    import torch
    from transformers import DynamicCache

    from .hf import build_cache, prepare_model

    prepare_model(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = list(range(1, n_layers)) if layers is None else list(layers)
    source = {"compressor": compressor} if not isinstance(compressor, str) else {"deltakv_path": compressor}
    totals = {layer: 0.0 for layer in layers}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * len(layers), desc="deltakv sensitivity", unit="layer", disable=not progress)
    for ids in prompts:
        # the prompt's end compresses only once the recent buffer holds twice the recent window
        needed = window + PROBE_KNOBS["num_sink_tokens"] + 2 * PROBE_KNOBS["num_recent_tokens"]
        if ids.shape[-1] <= needed:
            raise ValueError(f"a calibration prompt of {ids.shape[-1]} tokens is too short to probe DeltaKV's "
                             f"compression: it needs more than {needed} (window + sinks + twice the recent window)")
        ids = ids.to(model.device)
        head, tail = ids[:, :-window], ids[:, -window:]
        ref = _window_logprobs(model, head, tail, DynamicCache(config=model.config))
        for layer in layers:
            knobs = dict(PROBE_KNOBS, full_attn_layers=[i for i in range(n_layers) if i != layer], **source)
            got = _window_logprobs(model, head, tail, build_cache("deltakv", model.config, knobs))
            kl = (ref.exp() * (ref - got)).sum(-1).mean()
            totals[layer] += float(kl) / len(prompts)
            bar.update(1)
    bar.close()
    return totals


def most_sensitive(sensitivity: dict[int, float], pin: int) -> list[int]:
    """The ``pin`` layers of the largest sensitivity (ties: the earlier layer), sorted."""
    ranked = sorted(sensitivity, key=lambda layer: (-sensitivity[layer], layer))
    return sorted(ranked[:pin])
