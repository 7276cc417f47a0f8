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
import time
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


# ---------------------------------------------------------------------------------------------- generate
GENERATE_HELP = "generate text with a sparse KV cache and report its memory"


def add_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help=GENERATE_HELP, description=GENERATE_HELP + ".",
                       formatter_class=RegistryHelpFormatter)
    p.add_argument("--model", default="demo",
                   help="a Hugging Face model folder, a Hub id (org/name), 'demo' (SmolLM2-135M-Instruct) or "
                        "'qwen-coder' (default: demo)")
    p.add_argument("--method", default="snapkv",
                   help="'full' (plain generate, for comparison), 'all' (full and every method at its defaults, with a "
                        "table of KV bytes and answers) or a sparse method: {methods} (default: snapkv)")
    p.add_argument("--prompt", default=None, help="the prompt text (default: a built-in passkey prompt)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this text file")
    p.add_argument("--cache-config", default="{}", type=argtype(parse_json_object),
                   help="JSON object of the method's knobs, e.g. '{\"num_top_tokens\": 0.25}' (default: {})")
    p.add_argument("--max-new-tokens", type=argtype(positive_int), default=48, help="tokens to generate (default: 48)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as raw text instead of through the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: where the model loads)")
    p.add_argument("--engine", action="store_true",
                   help="run through the serving engine (sparse_hf.LLM) instead of HF generate; the engine serves "
                        "full attention and {engine_methods}")
    return p


def default_prompt() -> str:
    """A ~600-token passkey-retrieval prompt, so the demo shows eviction keeping what matters."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ") * 20
    return (f"There is a pass key hidden in the following text. Remember it.\n{filler}\n"
            f"The pass key is 68231. Remember it. 68231 is the pass key.\n{filler}\n"
            "What is the pass key? Answer with the number only.")


def check_generate_args(args) -> tuple[str, dict]:
    """Every check that needs no model: returns ``(prompt, knobs)`` or raises :class:`UsageError`."""
    check_model_arg(args.model)
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("pass --prompt or --prompt-file, not both")
    prompt = read_text_file(args.prompt_file, "--prompt-file") if args.prompt_file else (args.prompt or default_prompt())
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    knobs = args.cache_config
    if (args.method == "deltakv" and args.model == "demo" and knobs.get("compressor") is None
            and not knobs.get("deltakv_path")):
        knobs = dict(knobs, deltakv_path="demo")    # the compressor that ships for the demo model
    if args.method in ("full", "all"):
        if knobs:
            raise UsageError(f"--cache-config has no effect with --method {args.method} (full: plain generate; all: "
                             "every method at its defaults)")
        if args.method == "all" and args.engine:
            raise UsageError("--method all runs the HF path; pick one method for --engine")
    else:
        check_method_and_knobs(args.method, knobs, model_num_layers(args.model))
    check_device(args.device)
    if args.engine:
        from sparse_hf.engine.config import ENGINE_METHODS
        if args.method not in ("full",) + ENGINE_METHODS:
            raise UsageError(f"--engine --method {args.method}: the engine serves full and {', '.join(ENGINE_METHODS)}"
                             " (run without --engine for the HF path)")
    return prompt, knobs


def run_generate(args) -> int:
    try:
        prompt, knobs = check_generate_args(args)
    except UsageError as exc:
        return error_exit(str(exc), "generate")
    import torch

    from sparse_hf.models import load_model

    try:
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    except (OSError, ValueError) as exc:   # a Hub id that does not exist, an unsupported architecture, ...
        return error_exit(f"--model {args.model}: cannot load it ({exc})", "generate")
    if tok.chat_template and not args.no_chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        batch = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        batch = tok(prompt, return_tensors="pt")
    batch = batch.to(model.device)
    if args.engine:
        return _generate_with_engine(args, model, tok, batch["input_ids"][0].tolist(), knobs)
    methods = [args.method] if args.method != "all" else ["full", *method_names()]
    rows = []
    for method in methods:
        method_knobs = knobs if args.method != "all" else _demo_knobs(method, args.model)
        if method_knobs is None:
            print(f"\n--- {method}: skipped (needs a compressor: pass --method deltakv --cache-config "
                  "'{\"deltakv_path\": ...}')")
            continue
        try:
            answer, usage, seconds, prompt_len, new = _generate_once(model, tok, batch, method, method_knobs,
                                                                      args.max_new_tokens)
        except ValueError as exc:          # knobs that only this model's shape rules out
            return error_exit(str(exc), "generate")
        print(answer)
        print(f"\n--- {method}: prompt {prompt_len} tokens, {new} new, {seconds:.1f} s")
        print(usage.summary())
        rows.append((method, answer, usage.ratio, seconds))
    if len(rows) > 1:
        print("\n| method | KV bytes vs full | seconds | answer |\n|---|---|---|---|")
        for method, answer, ratio, seconds in rows:
            print(f"| {method} | {ratio:.1%} | {seconds:.1f} | {' '.join(answer.split())[:60]} |")
    return 0


def _demo_knobs(method: str, model: str) -> dict | None:
    """``--method all``: each method at its defaults; DeltaKV with the shipped compressor (demo model only)."""
    if method == "deltakv":
        return dict(deltakv_path="demo") if model == "demo" else None
    return {}


def _generate_once(model, tok, batch, method: str, knobs: dict, max_new_tokens: int):
    """Greedy ``generate`` with ``method`` (``"full"``: a plain cache): ``(answer, usage, seconds, prompt_len,
    new_tokens)``."""
    import torch

    import sparse_hf

    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    if method != "full":
        gen.update(cache_implementation=method, cache_config=knobs)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, **gen)
    seconds = time.perf_counter() - start
    prompt_len = batch["input_ids"].shape[1]
    answer = tok.decode(out.sequences[0, prompt_len:], skip_special_tokens=True).strip()
    cache = getattr(out, "cache", None) or out.past_key_values
    return answer, sparse_hf.kv_usage(cache), seconds, prompt_len, out.sequences.shape[1] - prompt_len


def _generate_with_engine(args, model, tok, prompt_ids: list[int], knobs: dict) -> int:
    """``generate --engine``: the same prompt through ``sparse_hf.LLM`` (greedy), with the KV it kept."""
    from sparse_hf.engine import LLM, SamplingParams

    method = None if args.method == "full" else args.method
    start = time.perf_counter()
    with LLM(model, tokenizer=tok, max_model_len=len(prompt_ids) + args.max_new_tokens,
             sparse_method=method, **knobs) as llm:
        out = llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens))[0]
    seconds = time.perf_counter() - start
    print(out.text.strip())
    m = out.metrics
    kept = m.get("kept_kv_tokens")
    total = len(prompt_ids) + len(out.token_ids)
    print(f"\n--- {args.method} (engine): prompt {len(prompt_ids)} tokens, {len(out.token_ids)} new, {seconds:.1f} s")
    if kept is not None:
        print(f"KV slots held at the end, summed over layers: {kept} of {total * model.config.num_hidden_layers} "
              f"for the full sequence ({kept / (total * model.config.num_hidden_layers):.1%})")
    return 0


# -------------------------------------------------------------------------------------------------- main
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
    "generate": (GENERATE_HELP, add_generate_parser),
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
