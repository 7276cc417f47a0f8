"""``sparse-hf`` command line: ``generate``, ``eval``, ``bench``, ``serve`` and ``train-compressor``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a sparse KV cache and report its memory")
    p.add_argument("--model", default="demo", help="a model directory, or 'demo' (SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="snapkv", help="streamingllm | snapkv | pyramidkv | omnikv | deltakv | full")
    p.add_argument("--prompt", default=None, help="the prompt text (default: a built-in passkey prompt)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--cache-config", default="{}", help="JSON dict of knobs, e.g. '{\"num_top_tokens\": 0.25}'")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)


def default_prompt() -> str:
    """A ~600-token passkey-retrieval prompt, so the demo shows eviction keeping what matters."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ") * 20
    return (f"There is a pass key hidden in the following text. Remember it.\n{filler}\n"
            f"The pass key is 68231. Remember it. 68231 is the pass key.\n{filler}\n"
            "What is the pass key? Answer with the number only.")


def run_generate(args) -> int:
    import torch

    import sparse_hf
    from sparse_hf.models import load_model

    try:
        knobs = json.loads(args.cache_config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--cache-config is not valid JSON: {e}")
    if not isinstance(knobs, dict):
        raise SystemExit("--cache-config must be a JSON object, e.g. '{\"num_top_tokens\": 0.25}'")
    valid = ["full", *sorted(sparse_hf.CACHE_CLASSES)]
    if args.method not in valid:
        raise SystemExit(f"unknown method {args.method!r}; valid methods are: {', '.join(valid)}")
    prompt = open(args.prompt_file).read() if args.prompt_file else (args.prompt or default_prompt())
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if tok.chat_template and not args.no_chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        batch = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        batch = tok(prompt, return_tensors="pt")
    batch = batch.to(model.device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    if args.method != "full":
        gen.update(cache_implementation=args.method, cache_config=knobs)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, **gen)
    seconds = time.perf_counter() - start
    prompt_len = batch["input_ids"].shape[1]
    print(tok.decode(out.sequences[0, prompt_len:], skip_special_tokens=True).strip())
    cache = getattr(out, "cache", None) or out.past_key_values
    usage = sparse_hf.kv_usage(cache)
    print(f"\n--- {args.method}: prompt {prompt_len} tokens, {out.sequences.shape[1] - prompt_len} new, "
          f"{seconds:.1f} s")
    print(usage.summary())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from sparse_hf.bench import add_bench_parser, run_bench_command
    from sparse_hf.engine.serve_cli import add_serve_parser, serve_main
    from sparse_hf.eval.cli import add_eval_parser, run_eval_command

    _add_generate(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    extra = {"eval": run_eval_command, "bench": run_bench_command, "serve": serve_main}
    sub.add_parser("train-compressor", help="train a DeltaKV compressor (see `sparse-hf train-compressor -h`)",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-compressor":
        return train_compressor_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    return extra[args.command](args) or 0


def train_compressor_main(argv=None) -> int:
    from sparse_hf.trainer.cli import main as train_main
    return train_main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
