"""``sparse-hf serve MODEL [--sparse-method M] [--sparse-knobs JSON] [engine knobs]``: the OpenAI-compatible server.

``add_serve_parser(subparsers)`` registers the subcommand and ``serve_main(args)`` runs it; ``python -m
sparse_hf.engine.serve_cli ...`` works without the main CLI. Argument errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROG = "sparse-hf serve"


def _fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text}")
    return value


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (the engine)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.error = _fail   # one line and exit 2, not the usage block
    p.add_argument("model", help="a model directory (config.json + safetensors), or 'demo' (SmolLM2-135M-Instruct)")
    from .config import DELTAKV_PREFILLS, ENGINE_METHODS

    p.add_argument("--sparse-method", default=None, choices=ENGINE_METHODS,
                   help=" | ".join(ENGINE_METHODS) + " (default: full attention)")
    p.add_argument("--sparse-knobs", default="{}",
                   help="JSON dict of the method's knobs (the HF path's cache_config names), e.g. "
                        "'{\"num_top_tokens\": 2048, \"num_recent_tokens\": 128}'")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the MODEL argument)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SPARSE_HF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SPARSE_HF_API_KEY, else none)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--max-model-len", type=_positive, default=None)
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    p.add_argument("--max-num-seqs", type=_positive, default=64)
    p.add_argument("--max-num-batched-tokens", type=_positive, default=8192)
    p.add_argument("--chunk-prefill-size", type=_positive, default=2048)
    p.add_argument("--num-kv-slots", type=_positive, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--tensor-parallel-size", type=_positive, default=1,
                   help="ranks that split the heads (one process each; under torchrun: the group's size)")
    p.add_argument("--deltakv-prefill", default="auto", choices=DELTAKV_PREFILLS,
                   help="deltakv only: 'auto' (long prompts layer by layer, the rest in chunks), 'chunked' or "
                        "'layerwise' (see the README's engine knobs)")
    p.add_argument("--layerwise-hidden-on-host", action="store_true",
                   help="deltakv only: a layer-wise prefill keeps its hidden states in pinned host memory "
                        "(longer prompts fit on the GPU)")
    p.add_argument("--tp-selection", default="exact", choices=["exact", "per_rank"],
                   help="exact: selections spanning ranks all-reduce their scores (TP=N outputs what TP=1 does); "
                        "per_rank: each rank selects from its own heads (cheaper, output differs from TP=1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _sparse_knobs(text: str) -> dict:
    try:
        knobs = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--sparse-knobs is not valid JSON ({exc}); e.g. '{{\"num_top_tokens\": 2048}}'")
    if not isinstance(knobs, dict):
        _fail("--sparse-knobs must be a JSON object, e.g. '{\"num_top_tokens\": 2048}'")
    return knobs


def build_llm(args):
    """The ``LLM`` for the parsed arguments; a bad knob is a one-line error (exit 2)."""
    import torch

    from .llm import LLM

    knobs = _sparse_knobs(args.sparse_knobs)
    model = args.model
    if model == "demo":
        from ..models import demo_model_dir
        model = str(demo_model_dir())
    elif not os.path.isdir(model):
        _fail(f"model directory {model!r} does not exist (give a folder with config.json, or 'demo')")
    try:
        return LLM(model, args.tokenizer, dtype=getattr(torch, args.dtype) if args.dtype else None,
                   device=args.device, max_model_len=args.max_model_len,
                   gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, chunk_prefill_size=args.chunk_prefill_size,
                   enforce_eager=args.enforce_eager, num_kv_slots=args.num_kv_slots,
                   sparse_method=args.sparse_method, tensor_parallel_size=args.tensor_parallel_size,
                   tp_selection=args.tp_selection, deltakv_prefill=args.deltakv_prefill,
                   layerwise_hidden_on_host=args.layerwise_hidden_on_host, **knobs)
    except (ValueError, TypeError, NotImplementedError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def serve_main(args) -> int:
    try:
        from .server import run_server
    except ImportError as exc:
        print(f"{PROG}: error: {exc}; the server needs the 'serve' extra: pip install 'sparse-hf[serve]'",
              file=sys.stderr)
        return 1

    llm = build_llm(args)
    if llm.tokenizer is None:
        _fail(f"no tokenizer found for {args.model!r}; pass --tokenizer DIR")
    name = args.served_model_name or args.model
    print(f"{PROG}: {name} on http://{args.host}:{args.port}/v1 (sparse_method={args.sparse_method})",
          file=sys.stderr)
    try:
        run_server(llm, host=args.host, port=args.port, api_key=args.api_key, model_name=name,
                   log_level=args.log_level)
    finally:
        llm.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
