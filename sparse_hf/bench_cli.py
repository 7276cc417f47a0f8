"""The ``sparse-hf bench`` command line: arguments, their checks, and the call to :func:`sparse_hf.bench.run_bench`.

Kept apart from :mod:`sparse_hf.bench` (which imports torch) so that parsing and argument errors load nothing heavy.
Defaults follow the device: the H200-sized grid on CUDA, a CPU-sized one (a tiny random model, prompts of a few
thousand tokens) on CPU.
"""

from __future__ import annotations

import argparse

from .cli import (RegistryHelpFormatter, UsageError, argtype, check_device, check_model_arg, error_exit, method_names,
                  positive_int)

BASELINES = ("vanilla", "hf-best")
#: (model, cases) when --model / --cases are not given.
GPU_DEFAULTS = ("qwen2.5-7b", "4096x8,32768x2,131072x1")
CPU_DEFAULTS = ("tiny", "1024x1,4096x1")
#: Random-weight model shapes ``--model`` accepts besides a folder (``AutoConfig.for_model`` knobs).
SHAPES = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=1 << 19, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                        max_position_embeddings=1 << 19, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 16),
}
BENCH_HELP = "speed and memory of each method, side by side with HF vanilla"


def parse_cases(spec: str) -> list[tuple[int, int]]:
    """``"4096x8,131072x1"`` -> ``[(4096, 8), (131072, 1)]`` (prompt length x batch)."""
    cases = []
    for part in spec.split(","):
        try:
            length, batch = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad case {part!r}: expected LENGTHxBATCH like 4096x8") from None
        if length < 1 or batch < 1:
            raise ValueError(f"bad case {part!r}: length and batch must be >= 1")
        cases.append((length, batch))
    return cases


def parse_budgets(spec) -> list[float]:
    """``"0.1,0.25"`` (or a list of numbers) -> ``[0.1, 0.25]``; each must be a fraction in (0, 1]."""
    try:
        budgets = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise ValueError(f"{spec!r}: expected fractions like 0.1,0.25") from None
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ValueError(f"{spec!r}: every budget must be a fraction in (0, 1], got {bad}")
    return budgets


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP + ".", formatter_class=RegistryHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"a model folder, 'demo', or a random-weight shape: {', '.join(SHAPES)} "
                        f"(default: {GPU_DEFAULTS[0]} on CUDA, {CPU_DEFAULTS[0]} on CPU)")
    p.add_argument("--methods", default="vanilla,hf-best,streamingllm,snapkv,pyramidkv,omnikv",
                   help="comma-separated: vanilla, hf-best, or a sparse method ({methods}); append +graph to a sparse "
                        "method for CUDA-graph decode (CUDA only) (default: %(default)s)")
    p.add_argument("--budgets", default="0.1,0.25", type=argtype(parse_budgets),
                   help="fractions of the prompt each sparse method keeps (default: 0.1,0.25)")
    p.add_argument("--cases", default=None, type=argtype(parse_cases),
                   help=f"LENGTHxBATCH,... prompt lengths and batch sizes (default: {GPU_DEFAULTS[1]} on CUDA, "
                        f"{CPU_DEFAULTS[1]} on CPU)")
    p.add_argument("--steps", type=argtype(positive_int), default=24, help="decode steps per case (default: 24)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--output", default="bench.json", help="where the JSON results go (default: bench.json)")
    p.add_argument("--plot", default=None, help="also write a PNG of decode tok/s per method and case")
    p.add_argument("--knob", action="append", default=[], type=argtype(parse_knob), metavar="METHOD:KEY=VALUE",
                   help="override one knob of one method after its budget rule, e.g. "
                        "omnikv:full_attn_layers=0,1,2,9,18 (repeatable)")
    return p


def parse_knob(spec: str) -> tuple[str, str, str]:
    """``"omnikv:full_attn_layers=0,1,2"`` -> ``("omnikv", "full_attn_layers", "0,1,2")``; the method must be a
    registered sparse method and the key one of its knobs."""
    from .methods import get_method     # torch: only when --knob is given

    method, sep, rest = spec.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not key:
        raise ValueError(f"bad knob {spec!r}: expected METHOD:KEY=VALUE like omnikv:full_attn_layers=0,1,2")
    if method not in method_names():
        raise ValueError(f"bad knob {spec!r}: unknown method {method!r}; valid: {', '.join(method_names())}")
    names = get_method(method).config_class.knob_names()
    if key not in names:
        raise ValueError(f"bad knob {spec!r}: {method} has no knob {key!r}; its knobs: {', '.join(sorted(names))}")
    return method, key, _number_or_text(value)


def _number_or_text(value: str):
    """``"4"`` -> 4, ``"0.25"`` -> 0.25 (knobs such as ``kv_quant_bits`` want numbers), ``"true"``/``"false"`` ->
    ``True``/``False`` (switches such as ``offload_latents``); anything else as given."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def check_methods(spec, on_cuda: bool) -> list[str]:
    """``"vanilla,snapkv+graph"`` (or a list) -> a list; unknown names, ``+graph`` on a baseline, or ``+graph``
    off CUDA raise :class:`~sparse_hf.cli.UsageError` (a ``ValueError``)."""
    methods = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    valid = method_names()
    for method in methods:
        base = method.removesuffix("+graph")
        if base not in (*BASELINES, *valid) or (method.endswith("+graph") and base in BASELINES):
            raise UsageError(f"--methods: unknown method {method!r}; valid: {', '.join((*BASELINES, *valid))} "
                             "(append +graph to a sparse method for CUDA-graph decode)")
        if method.endswith("+graph") and not on_cuda:
            raise UsageError(f"--methods: {method} needs CUDA (graph capture); drop +graph or run with --device cuda")
    if not methods:
        raise UsageError("--methods: no method given")
    return methods


def run_bench_command(args) -> int:
    try:
        if args.model is not None:
            check_model_arg(args.model, SHAPES)
        check_device(args.device)
        import torch

        on_cuda = torch.device(args.device).type == "cuda" if args.device else torch.cuda.is_available()
        model, cases = GPU_DEFAULTS if on_cuda else CPU_DEFAULTS
        model = args.model or model
        cases = args.cases or parse_cases(cases)
        methods = check_methods(args.methods, on_cuda)
    except UsageError as exc:
        return error_exit(str(exc), "bench")
    from .bench import run_bench

    try:
        run_bench(model, methods, args.budgets, cases, steps=args.steps, device=args.device, output=args.output,
                  plot=args.plot, knob_overrides=args.knob)
    except (ValueError, OSError) as exc:
        return error_exit(str(exc), "bench")
    return 0
