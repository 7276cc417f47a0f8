"""Method configurations: one frozen, validated dataclass per method, on a shared base.

Each method file defines its own config class (``SnapKVConfig`` in ``methods/snapkv.py``, ...), derived from
:class:`MethodConfig` (sinks and recent tokens) or :class:`TopTokensConfig` (plus ``num_top_tokens``). The shared
knobs keep one name everywhere, so ``cache_config={...}`` dicts work for every method that uses them. Knob
values are checked by the per-field checks below (one check per kind of knob), declared with :func:`knob`.

Runtime options (``cuda_graph``, the DeltaKV ``compressor`` object and ``deltakv_path``) are not method knobs:
:func:`split_runtime_options` separates them into a :class:`RuntimeOptions`.

``SparseConfig`` is kept for existing code: a flat container of any method's knobs, validated with the same
checks, that a cache converts into its method's config (:meth:`SparseConfig.to_dict`).

Knob names follow the reference implementation's README (Sparse-vLLM / DeltaKV).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

#: Filter (full-attention) layers of the reference HF defaults; entries beyond the model's depth are dropped.
DEFAULT_FULL_ATTN_LAYERS = (0, 1, 2, 3, 8, 16, 22)

#: Default ``num_top_tokens`` of every scoring method: a tenth of the prompt (or of the current length for
#: OmniKV/DeltaKV), so the defaults compress a prompt of any length.
DEFAULT_TOP_FRACTION = 0.1


# -- value checks: each returns the (normalised) value or raises ValueError naming the knob ------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_count(name: str, value: Any) -> int:
    """A token or layer count: an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an int >= 0")
    return value


def check_budget(name: str, value: Any) -> int | float:
    """A budget is a non-negative int (a count) or a float in (0, 1] (a fraction)."""
    if _is_int(value):
        if value < 0:
            raise ValueError(f"{name}={value}: a token count must be >= 0")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value}: a fraction must lie in (0, 1]; pass an int for a token count")
    else:
        raise ValueError(f"{name}={value!r}: expected an int (count) or a float in (0, 1] (fraction)")
    return value


def check_flag(name: str, value: Any) -> bool:
    """A switch: ``True`` or ``False`` only (a string such as ``"no"`` is an error, not true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected True or False")
    return value


def check_optional_flag(name: str, value: Any) -> bool | None:
    """``True``, ``False`` or ``None`` (automatic)."""
    return None if value is None else check_flag(name, value)


def check_ratio(name: str, value: Any) -> float:
    """A ratio in (0, 1]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a ratio in (0, 1]")
    return float(value)


def check_optional_ratio(name: str, value: Any) -> float | None:
    return None if value is None else check_ratio(name, value)


def check_odd(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name}={value!r}: expected an odd int >= 1")
    return value


def check_positive(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return value


def check_optional_count(name: str, value: Any) -> int | None:
    return None if value is None else check_count(name, value)


def check_optional_positive(name: str, value: Any) -> int | None:
    return None if value is None else check_positive(name, value)


def check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected a string (a directory or Hub id) or None")
    return value


def check_any(name: str, value: Any) -> Any:
    return value


def parse_layer_list(value: Any, name: str = "full_attn_layers") -> tuple[int, ...] | None:
    """Parse ``"0,1,2"`` or ``[0, 1, 2]`` into a sorted tuple of unique layer indices."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected comma-separated integers like '0,1,2'") from None
    elif isinstance(value, (list, tuple)):
        if not all(_is_int(v) for v in value):
            raise ValueError(f"{name}={value!r}: expected a list of integers")
        layers = list(value)
    else:
        raise ValueError(f"{name}={value!r}: expected a '0,1,2' string or a list of ints")
    if any(layer < 0 for layer in layers):
        raise ValueError(f"{name}={value!r}: layer indices must be >= 0")
    return tuple(sorted(set(layers)))


def check_layer_list(name: str, value: Any) -> tuple[int, ...] | None:
    return parse_layer_list(value, name)


def knob(default: Any, check: Callable[[str, Any], Any], help: str = "") -> Any:
    """A config field with its value check (run by ``__post_init__``) and a one-line description."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


def resolve_count(budget: int | float, n: int) -> int:
    """A budget as a token count for a sequence of ``n`` tokens: ints are counts, floats fractions of ``n``."""
    if isinstance(budget, float):
        return int(n * budget)
    return int(budget)


def resolve_counts(budget: int | float, n: "torch.Tensor") -> "torch.Tensor":
    """:func:`resolve_count` per row on the device: ``n`` ``[B]`` long token counts -> ``[B]`` long budgets."""
    if isinstance(budget, float):
        return (n.double() * budget).long()
    return n.new_full(n.shape, int(budget))


# -- configs ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: the attention sinks and the recent window, which every method keeps.

    Subclasses (one per method, in the method's file) add their knobs with :func:`knob` and cross-knob rules in
    :meth:`validate`. Instances are immutable: :meth:`replace` returns a new, re-validated config.
    """

    method_name: ClassVar[str] = ""

    num_sink_tokens: int = knob(8, check_count, "first tokens of each row, always kept")
    num_recent_tokens: int = knob(128, check_count, "last tokens of each row, always kept")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                try:
                    value = check(f.name, getattr(self, f.name))
                except ValueError as e:
                    raise ValueError(f"{self._label()}{e} ({self._knob_list()})") from None
                object.__setattr__(self, f.name, value)
        try:
            self.validate()
        except ValueError as e:
            raise ValueError(f"{self._label()}{e}") from None

    def validate(self) -> None:
        """Rules that involve several knobs; raise ``ValueError``."""

    # -- helpers --------------------------------------------------------------------------------------------------
    @classmethod
    def _label(cls) -> str:
        return f"{cls.method_name}: " if cls.method_name else ""

    @classmethod
    def knob_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _knob_list(cls) -> str:
        who = f"{cls.method_name}'s" if cls.method_name else "valid"
        return f"{who} knobs are: {', '.join(cls.knob_names())}"

    @classmethod
    def from_dict(cls, knobs: dict | None) -> "MethodConfig":
        """Build from a dict of knobs; a knob this method does not use raises ``ValueError`` naming its knobs.

        Runtime options must have been split off first (:func:`split_runtime_options`)."""
        knobs = dict(knobs or {})
        unknown = sorted(k for k in knobs if k not in cls.knob_names())
        if unknown:
            raise ValueError(f"{cls._label()}unknown sparse-hf knob(s) {unknown} for this method; "
                             f"{cls._knob_list()}")
        return cls(**knobs)

    def replace(self, **changes) -> "MethodConfig":
        """A new config with ``changes`` applied and validated; ``self`` is left as it was."""
        unknown = sorted(k for k in changes if k not in self.knob_names())
        if unknown:
            raise ValueError(f"{self._label()}unknown sparse-hf knob(s) {unknown}; {self._knob_list()}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class TopTokensConfig(MethodConfig):
    """Base of the scoring methods: ``num_top_tokens`` middle tokens chosen by score, beyond sinks and recent."""

    num_top_tokens: int | float = knob(DEFAULT_TOP_FRACTION, check_budget,
                                       "middle tokens kept: a count, or a fraction of the prompt")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a cache runs, not what it keeps.

    Attributes:
        cuda_graph: ``True`` replays decode steps from captured CUDA graphs, ``False`` runs eagerly, ``None``
            (default) decides automatically (graphs on CUDA where safe).
        compressor: a ``DeltaKVCompressor`` (DeltaKV only).
        deltakv_path: a directory or Hub id to load the compressor from, or a shipped compressor's name
            (``"demo"``, ``"qwen-coder"``) (DeltaKV only).
    """

    cuda_graph: bool | None = knob(None, check_optional_flag, "None: automatic")
    compressor: Any = knob(None, check_any, "a DeltaKVCompressor (deltakv)")
    deltakv_path: str | None = knob(None, check_optional_str, "compressor directory or Hub id (deltakv)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))


RUNTIME_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RuntimeOptions))


def split_runtime_options(knobs: dict | None) -> tuple[dict, RuntimeOptions]:
    """Split a ``cache_config`` dict into (method knobs, :class:`RuntimeOptions`); the input is not modified."""
    knobs = dict(knobs or {})
    runtime = {name: knobs.pop(name) for name in RUNTIME_OPTION_NAMES if name in knobs}
    return knobs, RuntimeOptions(**runtime)


def cache_config_dict(cache_config: Any) -> dict:
    """Any accepted ``cache_config`` as a plain dict of knobs (runtime options included).

    Accepts ``None``, a dict, a :class:`SparseConfig` or a :class:`MethodConfig`; anything else is an error that
    says what to pass."""
    if cache_config is None:
        return {}
    if isinstance(cache_config, dict):
        return dict(cache_config)
    if isinstance(cache_config, (SparseConfig, MethodConfig)):
        return cache_config.to_dict()
    if isinstance(cache_config, str):
        raise ValueError(f"cache_config={cache_config!r} is a string; pass a dict of knobs such as "
                         "cache_config={'num_top_tokens': 256} (or a SparseConfig / method config object)")
    raise ValueError(f"cache_config must be a dict of knobs, a SparseConfig or a method config, "
                     f"got {type(cache_config).__name__}")


def _all_knob_fields() -> dict[str, dataclasses.Field]:
    """Every knob of every registered method plus the runtime options, by name (first definition wins)."""
    from .methods import METHODS   # late import: the method files import this module

    fields: dict[str, dataclasses.Field] = {}
    for cls in [RuntimeOptions, *(m.config_class for m in METHODS.values())]:
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f)
    return fields


class SparseConfig:
    """Flat container of any method's knobs (kept for existing code; prefer a dict or a method config).

    ``SparseConfig(num_top_tokens=256, cuda_graph=True)`` checks each value with the same checks as the method
    configs and rejects names no method knows; a cache then builds its method's config from the knobs given
    here (:meth:`to_dict`), so a knob the chosen method does not use is rejected there. Reading a knob that was
    not given returns its default (the first method config that defines it).
    """

    def __init__(self, **knobs):
        fields = _all_knob_fields()
        unknown = sorted(k for k in knobs if k not in fields)
        if unknown:
            raise ValueError(f"unknown sparse-hf knob(s) {unknown}; valid knobs are: {', '.join(fields)}")
        checked = {}
        for name, value in knobs.items():
            check = fields[name].metadata.get("check", check_any)
            checked[name] = check(name, value)
        object.__setattr__(self, "_knobs", checked)

    @classmethod
    def from_dict(cls, knobs: dict | None) -> "SparseConfig":
        return cls(**dict(knobs or {}))

    @classmethod
    def knob_names(cls) -> list[str]:
        return list(_all_knob_fields())

    def to_dict(self) -> dict:
        """The knobs that were given (not the defaults)."""
        return dict(self._knobs)

    def __getattr__(self, name: str):
        knobs = self.__dict__.get("_knobs", {})
        if name in knobs:
            return knobs[name]
        fields = _all_knob_fields()
        if name in fields:
            return fields[name].default
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError("SparseConfig is read-only; build a new one")

    def __eq__(self, other):
        return isinstance(other, SparseConfig) and self._knobs == other._knobs

    def __repr__(self):
        return f"SparseConfig({', '.join(f'{k}={v!r}' for k, v in self._knobs.items())})"
