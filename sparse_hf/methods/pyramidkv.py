"""PyramidKV: SnapKV with per-layer budgets that shrink with depth (Cai et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_count, check_optional_count, check_ratio, knob, resolve_count
from .snapkv import SnapKV, SnapKVConfig


@dataclass(frozen=True)
class PyramidKVConfig(SnapKVConfig):
    """SnapKV's knobs plus the pyramid schedule."""

    method_name = "pyramidkv"

    pyramid_start_layer: int = knob(0, check_count, "layers below it keep the full ratio 1")
    pyramid_start_ratio: float = knob(0.6, check_ratio, "schedule value at pyramid_start_layer")
    pyramid_least_ratio: float = knob(0.01, check_ratio, "schedule value at pyramid_least_layer and after")
    pyramid_least_layer: int | None = knob(None, check_optional_count, "None: the last layer")


def pyramid_ratios(num_layers: int, start_layer: int, start_ratio: float, least_ratio: float,
                   least_layer: int | None = None) -> list[float]:
    """The reference schedule: 1.0 below ``start_layer``, then linear from ``start_ratio`` down to
    ``least_ratio`` at ``least_layer`` (default: the last layer), ``least_ratio`` after it."""
    least_layer = num_layers - 1 if least_layer is None else min(least_layer, num_layers - 1)
    ratios = []
    for layer in range(num_layers):
        if layer < start_layer:
            ratios.append(1.0)
        elif layer >= least_layer:
            ratios.append(least_ratio)
        else:
            t = (layer - start_layer) / max(1, least_layer - start_layer)
            ratios.append(start_ratio + t * (least_ratio - start_ratio))
    return ratios


class PyramidKV(SnapKV):
    """Scores like SnapKV; layer ``l`` keeps ``num_top_tokens * r_l / mean(r)`` middle tokens.

    Normalising the schedule by its mean keeps the *average* per-layer budget equal to ``num_top_tokens``,
    so PyramidKV and SnapKV at the same knob hold the same memory (up to per-layer caps at the prompt length).
    """

    name = "pyramidkv"
    config_class = PyramidKVConfig

    def __init__(self, config, num_layers):
        super().__init__(config, num_layers)
        c = self.config
        ratios = pyramid_ratios(num_layers, c.pyramid_start_layer, c.pyramid_start_ratio, c.pyramid_least_ratio,
                                c.pyramid_least_layer)
        mean = sum(ratios) / len(ratios)
        self.layer_weights = [r / mean for r in ratios]

    def layer_top_count(self, layer_idx: int, prompt_len: int) -> int:
        return int(round(resolve_count(self.config.num_top_tokens, prompt_len) * self.layer_weights[layer_idx]))
