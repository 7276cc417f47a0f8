"""The ``sparse-hf eval`` subcommand: ``add_eval_parser(subparsers)`` and ``run_eval_command(args)``.

Grid options are validated while parsing (argparse prints ``argument --budgets: ...`` and exits with
status 2); the model name, the LongBench folder and the knobs of every method are checked next, still before any
model is loaded. Every user error is one line on stderr and exit status 2. Example::

    sparse-hf eval --model demo --tasks niah_single,ruler_vt --methods full,snapkv \\
        --budgets 0.1,0.25 --lengths 1024,2048 --depths 0,0.5,1 --output-dir out/eval
"""

from __future__ import annotations

import argparse
import os
import sys

from sparse_hf.cli import argtype, parse_json_object, positive_int

from .grid import VALID_METHODS, parse_budgets, parse_depths, parse_lengths, parse_methods
from .tasks import LOCAL_TASKS, parse_tasks
from .text_recall import corpus_path


def _chat_mode(text: str):
    modes = {"auto": "auto", "yes": True, "true": True, "no": False, "false": False}
    if text.lower() not in modes:
        raise ValueError(f"{text!r}: expected auto, yes or no")
    return modes[text.lower()]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="evaluate sparse KV caches on needle, RULER-style and LongBench tasks",
        description="Evaluate methods x budgets on tasks x context lengths (x needle depths); writes "
                    "predictions.jsonl, summary.json, summary.md and plots. Reruns resume where they stopped.")
    p.add_argument("--model", required=True,
                   help="a Hugging Face model folder, a Hub id (org/name), 'demo' or 'qwen-coder'")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default: auto, the loader's float32)")
    p.add_argument("--tasks", required=True, type=argtype(parse_tasks),
                   help=f"comma-separated: {', '.join(LOCAL_TASKS)}, longbench:<task>, longbench:all")
    p.add_argument("--methods", default="full", type=argtype(parse_methods),
                   help=f"comma-separated from: {', '.join(VALID_METHODS)} (default: full)")
    p.add_argument("--budgets", default="0.1,0.25,0.5", type=argtype(parse_budgets),
                   help="KV budgets as fractions of the prompt in (0, 1] (default: 0.1,0.25,0.5)")
    p.add_argument("--lengths", default="1024", type=argtype(parse_lengths),
                   help="context lengths in tokens (LongBench: truncation budget) (default: 1024)")
    p.add_argument("--depths", default="0,0.5,1", type=argtype(parse_depths),
                   help="needle depths in [0, 1] (default: 0,0.5,1)")
    p.add_argument("--num-samples", default=5, type=argtype(positive_int), help="samples per cell (default: 5)")
    p.add_argument("--seed", default=0, type=int, help="seed of the synthetic tasks (default: 0)")
    p.add_argument("--output-dir", default="eval_out", help="where results go (default: eval_out)")
    p.add_argument("--longbench-dir", default=None,
                   help="folder with the official LongBench <task>.jsonl files (unzipped data.zip)")
    p.add_argument("--max-new-tokens", default=None, type=argtype(positive_int),
                   help="override every task's generation length")
    p.add_argument("--chat-template", default="auto", type=argtype(_chat_mode),
                   help="auto (use it if the tokenizer has one), yes or no (default: auto)")
    p.add_argument("--cache-config", default=None, type=argtype(parse_json_object),
                   help="extra knobs for every sparse run as a JSON object, e.g. '{\"pool_kernel_size\": 5}' or, with "
                        "--methods deltakv, '{\"deltakv_path\": \"out/compressor\"}' (a folder written by "
                        "sparse-hf train-compressor, or a Hub id)")
    p.add_argument("--corpus-file", default=None,
                   help="text for text_recall: .jsonl with a \"text\" field per line, or .txt (default: the held-out "
                        "novel that examples/prepare_corpus.py writes)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--engine", action="store_true",
                   help="generate with the serving engine (sparse_hf.engine.LLM over the loaded model): each method "
                        "and budget's prompts run batched together with the same knobs, greedy and stop rule; much "
                        "faster on a GPU than one generate() call per sample")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_eval_command)
    return p


def _check_compressor_path(knobs: dict | None) -> None:
    """``deltakv_path`` must be a folder (``DeltaKVCompressor.save_pretrained``) or a Hub id, not a file."""
    from sparse_hf.cli import UsageError

    path = (knobs or {}).get("deltakv_path")
    if isinstance(path, str) and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"deltakv_path {path}: is a file; pass the folder written by sparse-hf train-compressor "
                         "(config.json + model.safetensors) or a Hub id")


def _device(device: str | None) -> str:
    """``--device``, or cuda when available (the long grids belong on a GPU), else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_eval_command(args) -> int:
    """Load the model with ``sparse_hf.models.load_model`` and run :func:`sparse_hf.eval.run_eval`.

    Errors in the inputs (bad knobs, missing LongBench files, ...) are printed as one line and give status 2.
    """
    from sparse_hf.cli import UsageError, check_device, check_model_arg, error_exit

    from .runner import budget_to_cache_config, run_eval

    try:
        check_model_arg(args.model)
        check_device(getattr(args, "device", None))
        if args.longbench_dir is not None and not os.path.isdir(args.longbench_dir):
            raise UsageError(f"--longbench-dir {args.longbench_dir}: no such folder")
        if "text_recall" in args.tasks:
            try:
                corpus_path(args.corpus_file)
            except FileNotFoundError as exc:
                raise UsageError(str(exc)) from None
        if getattr(args, "engine", False):
            from sparse_hf.engine.config import ENGINE_METHODS

            missing = [m for m in args.methods if m not in ("full",) + ENGINE_METHODS]
            if missing:
                raise UsageError(f"--engine: the engine does not run {', '.join(missing)} (it runs "
                                 f"{', '.join(ENGINE_METHODS)}); drop --engine for those methods")
        for method in args.methods:              # each method's knobs, as run_eval will build them
            if method != "full":
                budget_to_cache_config(method, args.budgets[0], max(args.lengths), args.cache_config)
        _check_compressor_path(args.cache_config)
    except ValueError as exc:
        return error_exit(str(exc), "eval")
    import sparse_hf  # noqa: F401  (registers the sparse caches with transformers)
    from sparse_hf.models import load_model

    try:
        model, tokenizer = load_model(args.model, args.dtype, _device(getattr(args, "device", None)))
        summary = run_eval(model, tokenizer, tasks=args.tasks, methods=args.methods, budgets=args.budgets,
                           lengths=args.lengths, depths=args.depths, num_samples=args.num_samples,
                           seed=args.seed, output_dir=args.output_dir, max_new_tokens=args.max_new_tokens,
                           use_chat_template=args.chat_template, progress=not args.no_progress,
                           longbench_dir=args.longbench_dir, cache_config=args.cache_config,
                           corpus_file=args.corpus_file, engine=getattr(args, "engine", False))
    except (ValueError, OSError) as exc:
        return error_exit(str(exc), "eval")
    for row in summary["overall"]:
        budget = "" if row["method"] == "full" else f" @ {row['budget']:g}"
        read = row.get("read_tokens")
        use = "" if read is None or read != read else f", reads {read:.0f} tokens per sparse layer"
        print(f"{row['method']}{budget}: {100 * row['score']:.1f} (95% CI {100 * row['ci_low']:.0f}-"
              f"{100 * row['ci_high']:.0f}, n={row['num_samples']}{use})")
    print(f"{summary['num_generated']} new predictions, {summary['num_skipped']} reused; results in "
          f"{args.output_dir}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point (``python -m sparse_hf.eval.cli ...``) until the top-level CLI wires it in."""
    from sparse_hf.cli import ArgumentParser

    parser = ArgumentParser(prog="sparse-hf")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
