"""``sparse-hf`` command line: ``generate``, ``eval``, ``bench``, ``serve``, ``calibrate`` and ``train-compressor``.

Every user error (a missing file or model folder, bad JSON, an unknown method or knob, a bad number) is printed as
one line, ``sparse-hf: error: ...``, with exit status 2, and is found before any model loads. Arguments are parsed
before anything heavy is imported: ``sparse-hf --help`` and the plain argument checks load neither torch nor
transformers; the method registry (torch, no transformers) loads only to check ``--method`` and the knobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "sparse-hf"
EMBEDDED = ("demo", "qwen-coder")   # names load_model resolves itself (see sparse_hf.models)


class UsageError(ValueError):
    """A mistake in the command line: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: message (see `prog --help`)``, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def error_exit(message: str, command: str | None = None) -> int:
    """Print ``sparse-hf[ command]: error: message`` (whitespace collapsed to one line) on stderr and return the
    usage status (2)."""
    prefix = PROG if command is None else f"{PROG} {command}"
    print(f"{prefix}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def method_names() -> list[str]:
    """The registered sparse methods (imports the method registry: torch, not transformers)."""
    from sparse_hf.methods import METHODS
    return sorted(METHODS)


class RegistryHelpFormatter(argparse.HelpFormatter):
    """Fills ``{methods}`` in a help string with the registered methods, only when help is printed."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action) or ""
        if "{methods}" in text:
            text = text.replace("{methods}", ", ".join(method_names()))
        if "{engine_methods}" in text:
            from sparse_hf.engine.config import ENGINE_METHODS
            text = text.replace("{engine_methods}", ", ".join(ENGINE_METHODS))
        return text


# ------------------------------------------------------------------------------------------ cheap checks
def argtype(parser_fn):
    """Wrap a ``ValueError``-raising parser as an argparse type (one-line 'argument --x: ...' errors)."""
    def convert(text):
        try:
            return parser_fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parser_fn.__name__.replace("parse_", "")
    return convert


def positive_int(text: str) -> int:
    """``"3"`` -> 3; anything but an integer >= 1 raises ``ValueError``."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{text!r}: expected an integer >= 1")
    return value


def parse_json_object(text: str) -> dict:
    """A JSON object given on the command line (``--cache-config``) -> a dict, or ``ValueError`` with an example.

    ``@FILE`` reads the object from a file (e.g. the ``calibration.json`` that ``sparse-hf calibrate`` writes)."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {text[1:]} ({exc.strerror or exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc}); example: '{{\"num_top_tokens\": 0.25}}'") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object, e.g. '{\"num_top_tokens\": 0.25}'")
    return value


def check_model_arg(name: str, extra_names: tuple[str, ...] = ()) -> None:
    """``name`` must be an embedded model ('demo', ...), an existing model folder, or a Hub id ``org/name``.

    A path that does not exist (``./m``, ``/x/m``, ``~/m``, ``a/b/c``, or a folder without ``config.json``) raises
    :class:`UsageError` naming what was expected; a Hub id is left to the loader."""
    if name in EMBEDDED or name in extra_names:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"--model {name}: {path} has no config.json; pass a Hugging Face model folder, a Hub id "
                             "(org/name) or 'demo'")
        return
    if path.exists():
        raise UsageError(f"--model {name}: not a folder; pass a Hugging Face model folder, a Hub id (org/name) or 'demo'")
    hub_like = name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))
    if not hub_like:
        choices = ", ".join(repr(x) for x in (*EMBEDDED, *extra_names))
        raise UsageError(f"--model {name}: no such model folder; pass a Hugging Face model folder, a Hub id "
                         f"(org/name) or one of {choices}")


def read_text_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: is a folder, expected a text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc})") from None


def model_num_layers(name: str) -> int | None:
    """``num_hidden_layers`` from a local model folder's config.json (no model load), else ``None`` (then the
    layer-dependent checks run when the cache is built)."""
    try:
        config = json.loads((Path(name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers")
    return layers if isinstance(layers, int) and layers > 0 else None


def check_method_and_knobs(method: str, knobs: dict, num_layers: int | None = None) -> None:
    """Validate ``knobs`` for ``method`` as the cache will (the registry's ``get_method`` and the config's own
    checks, plus the method's layer checks when the depth is known), without loading a model."""
    from sparse_hf.methods import get_method

    try:
        method_cls = get_method(method)
    except ValueError:
        raise UsageError(f"--method {method}: unknown; valid methods are: full, {', '.join(method_names())}") from None
    try:
        config, runtime = method_cls.build_config(**knobs)
        method_cls.check_runtime(runtime)
        if num_layers:
            method_cls(config, num_layers)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--cache-config: {' '.join(str(exc).split())}") from None


def check_device(device: str | None) -> None:
    """``--device``: a torch device string that exists on this machine (imports torch)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# -------------------------------------------------------------------------------------------------- main
GENERATE_HELP = "generate text with a sparse KV cache and report its memory"


def _add_generate(sub):
    from sparse_hf.generate_cli import add_generate_parser
    return add_generate_parser(sub)


def _add_eval(sub):
    from sparse_hf.eval.cli import add_eval_parser
    return add_eval_parser(sub)


def _add_bench(sub):
    from sparse_hf.bench_cli import add_bench_parser
    return add_bench_parser(sub)


def _add_calibrate(sub):
    from sparse_hf.calibrate import add_calibrate_parser
    return add_calibrate_parser(sub)


def _add_serve(sub):
    from sparse_hf.engine.serve_cli import add_serve_parser
    return add_serve_parser(sub)


#: command -> (one-line help, builder that adds its full parser). Only the chosen command's builder runs, so the
#: others' imports (the eval tasks, the method registry) stay out of ``sparse-hf --help`` and unrelated commands.
COMMANDS = {
    "generate": (GENERATE_HELP, _add_generate),
    "eval": ("evaluate sparse KV caches on needle, RULER-style and LongBench tasks", _add_eval),
    "bench": ("speed and memory of each method, side by side with HF vanilla", _add_bench),
    "serve": ("serve a model over an OpenAI-compatible HTTP API (the engine)", _add_serve),
    "calibrate": ("choose OmniKV/DeltaKV filter layers for a model (writes a cache_config file)", _add_calibrate),
    "train-compressor": ("train a DeltaKV compressor (see `sparse-hf train-compressor -h`)", None),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s sub-parser gets its arguments (the others show their help line)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, builder) in COMMANDS.items():
        if name == command and builder is not None:
            builder(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=builder is not None)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command == "train-compressor":
        return train_compressor_main(argv[1:])
    args = build_parser(command).parse_args(argv)
    if args.command == "generate":
        from sparse_hf.generate_cli import run_generate
        return run_generate(args)
    if args.command == "eval":
        from sparse_hf.eval.cli import run_eval_command
        return run_eval_command(args) or 0
    if args.command == "calibrate":
        from sparse_hf.calibrate import run_calibrate_command
        return run_calibrate_command(args)
    if args.command == "serve":
        from sparse_hf.engine.serve_cli import serve_main
        return serve_main(args) or 0
    from sparse_hf.bench_cli import run_bench_command
    return run_bench_command(args) or 0


def train_compressor_main(argv=None) -> int:
    from sparse_hf.trainer.cli import main as train_main
    return train_main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
