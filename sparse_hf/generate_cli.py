"""``sparse-hf generate``: one prompt through one method (or all of them), on the HF path or the engine, with the
KV memory each held. Its arguments are checked before any model loads (see :mod:`sparse_hf.cli`)."""

from __future__ import annotations

import argparse
import time

from .cli import (GENERATE_HELP, RegistryHelpFormatter, UsageError, argtype, check_device, check_method_and_knobs,
                  check_model_arg, error_exit, method_names, model_num_layers, parse_json_object, positive_int,
                  read_text_file)


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
                   help="JSON object of the method's knobs, e.g. '{\"num_top_tokens\": 0.25}' (default: {}; "
                        "deltakv on 'demo' or 'qwen-coder' gets the compressor shipped for it unless deltakv_path "
                        "is given)")
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
    if args.method == "deltakv" and knobs.get("compressor") is None and not knobs.get("deltakv_path"):
        knobs = dict(knobs, **(_shipped_compressor(args.model) or {}))  # the one that ships for --model, if any
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
        if len(methods) > 1:
            print(f"\n=== {method} ===", flush=True)     # the answer streams below, then the method's numbers
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
        print(demo_table(rows))
    return 0


#: What each method is expected to do with the demo's passkey (a number in the middle of ~1K tokens), shown under
#: ``--method all``'s table so that a lost passkey reads as the method's known behaviour, not as a failure.
DEMO_NOTES = {
    "streamingllm": "keeps only the first (sink) and the most recent tokens, so a passkey in the middle is gone",
    "h2o": "keeps the tokens with the most attention summed over all queries, which favours early tokens; it "
           "loses mid-prompt needles at this budget (docs/accuracy.md: 0 of 60 at 2K)",
    "omnikv": "evicts nothing: it keeps every token and reads its filter layers' top tokens at each step, so its "
              "KV bytes are a full cache's (plus its index buffers) and its speed comes from reading less",
}


def demo_table(rows: list[tuple[str, str, float, float]]) -> str:
    """``--method all``'s summary: per ``(method, answer, KV ratio, seconds)`` row, whether the answer is the
    full cache's (the first row when it is ``"full"``), then a note for each method whose behaviour explains it."""
    full = next((answer for method, answer, _, _ in rows if method == "full"), None)
    lines = ["", "| method | KV bytes vs full | seconds | same answer as full | answer |", "|---|---|---|---|---|"]
    for method, answer, ratio, seconds in rows:
        same = "-" if full is None or method == "full" else ("yes" if answer.strip() == full.strip() else "no")
        lines.append(f"| {method} | {ratio:.1%} | {seconds:.1f} | {same} | {' '.join(answer.split())[:60]} |")
    notes = [f"- {method}: {DEMO_NOTES[method]}" for method, *_ in rows if method in DEMO_NOTES]
    return "\n".join(lines + ([""] + notes if notes else []))


def _shipped_compressor(model: str) -> dict | None:
    """``{"deltakv_path": model}`` when a compressor ships for the embedded model ``model`` ('demo',
    'qwen-coder'), else ``None``. Imports the (torch-importing) DeltaKV package only when asked."""
    from sparse_hf.deltakv.demo import SHIPPED_COMPRESSORS

    return dict(deltakv_path=model) if model in SHIPPED_COMPRESSORS else None


def _demo_knobs(method: str, model: str) -> dict | None:
    """``--method all``: each method at its defaults; DeltaKV with the compressor shipped for ``model`` (the
    embedded models 'demo' and 'qwen-coder' only)."""
    if method == "deltakv":
        return _shipped_compressor(model)
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


