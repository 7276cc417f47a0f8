"""``run_eval``: generate over the grid methods x budgets x tasks x lengths (x depths), score, and report.

Greedy decoding, batch size 1. ``full`` is plain ``model.generate``; a sparse method is
``model.generate(..., cache_implementation=method, cache_config=budget_to_cache_config(...))`` (the caches are
registered by ``import sparse_hf``). Every prediction is appended to ``predictions.jsonl`` as soon as it is
scored, so an interrupted run resumes where it stopped: keys already in the file are skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..methods.base import budget_tokens
from .grid import parse_budgets, parse_depths, parse_lengths, parse_methods
from .metrics import score_sample
from .plots import make_plots
from .report import read_predictions, record_key, summarize, write_summary
from .tasks import build_samples, is_needle, parse_tasks
from .text_recall import load_paragraphs

def budget_to_cache_config(method: str, fraction: float, prompt_len: int, extra: dict | None = None) -> dict | None:
    """The ``cache_config`` that gives ``method`` a KV budget of ``fraction`` of a ``prompt_len``-token prompt.

    ``full`` gets ``None`` (vanilla generate, no budget); a sparse method gets its own rule,
    ``knobs_for_budget(fraction, prompt_len)`` (the same one ``bench`` and the CLI use). ``extra`` (e.g.
    ``{"deltakv_path": ...}``) is merged last; the result is validated by the method's config. For deltakv, filter
    layers the compressor records (and ``extra`` does not set) are written out, so a record says what served.
    """
    methods = parse_methods([method])
    method = methods[0]
    if method == "full":
        return None
    fraction = parse_budgets([fraction])[0]
    from ..methods import get_method

    method_class = get_method(method)
    config = dict(method_class.knobs_for_budget(fraction, prompt_len), **(extra or {}))
    if method == "deltakv" and "full_attn_layers" not in config and isinstance(config.get("deltakv_path"), str):
        from ..deltakv.demo import recorded_filter_layers

        layers = recorded_filter_layers(config["deltakv_path"])   # the compressor's serving default, made explicit
        if layers is not None:
            config["full_attn_layers"] = layers
    method_class.build_config(config)  # unknown knobs / bad values raise here, before any generation
    return config


def encode_sample(tokenizer, sample: dict, use_chat_template="auto"):
    """Token ids (1 x n tensor) of the sample's prompt plus answer prefix, with the chat template if due.

    ``use_chat_template``: ``"auto"`` applies the tokenizer's template when it has one and the task allows it
    (LongBench few-shot/code tasks do not); ``True`` forces it where the task allows it; ``False`` never.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template not in ("auto", True, False):
        raise ValueError(f"use_chat_template={use_chat_template!r}: expected 'auto', True or False")
    if use_chat_template is True and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    if use_chat_template and has_template and sample.get("chat_template", True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        text += sample.get("answer_prefix", "").lstrip()
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(sample["prompt"] + sample.get("answer_prefix", ""), return_tensors="pt")["input_ids"]


def generate_one(model, tokenizer, input_ids, method: str, cache_config: dict | None, max_new_tokens: int) -> str:
    """Greedy generation of at most ``max_new_tokens`` tokens; returns the decoded continuation."""
    return generate_with_use(model, tokenizer, input_ids, method, cache_config, max_new_tokens)[0]


def generate_with_use(model, tokenizer, input_ids, method: str, cache_config: dict | None,
                      max_new_tokens: int) -> tuple[str, dict]:
    """:func:`generate_one` plus what its cache kept and read (:func:`~sparse_hf.eval.budget_use.budget_use`)."""
    import torch

    from .budget_use import budget_use

    input_ids = input_ids.to(model.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                  return_dict_in_generate=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    if method != "full":
        kwargs.update(cache_implementation=method, cache_config=cache_config)
    with torch.inference_mode():
        out = model.generate(**kwargs)
    text = tokenizer.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
    return text, budget_use(getattr(out, "cache", None) or out.past_key_values)   # "cache" from transformers 5.2x


def _build_all(tokenizer, tasks, lengths, depths, num_samples, seed, longbench_dir, progress,
               corpus_file=None) -> list[dict]:
    from tqdm.auto import tqdm

    from .longbench import load_longbench

    cells = [(t, n, d) for t in tasks for n in lengths for d in (depths if is_needle(t) else [None])]
    rows_cache: dict[str, list[dict]] = {}
    paragraphs = load_paragraphs(corpus_file) if "text_recall" in tasks else None
    samples: list[dict] = []
    for task, length, depth in tqdm(cells, desc="building prompts", disable=not progress):
        rows = None
        if task.startswith("longbench:"):
            if task not in rows_cache:
                rows_cache[task] = load_longbench(task[10:], longbench_dir)
            rows = rows_cache[task]
        samples += build_samples(task, tokenizer, length, num_samples, seed, depth, longbench_dir, rows,
                                 paragraphs=paragraphs)
    return samples


def _check_same_knobs(existing: list[dict], cache_config: dict | None, pred_path) -> None:
    """Resuming reuses predictions by (method, budget, task, length, depth, id); ones made with other knobs (e.g.
    another ``selection_scope``) would silently stand in for this run's, so they are an error."""
    for rec in existing:
        if rec.get("method", "full") == "full" or "prompt_tokens" not in rec or "cache_config" not in rec:
            continue
        try:
            now = budget_to_cache_config(rec["method"], rec["budget"], rec["prompt_tokens"], cache_config)
        except ValueError:
            continue                          # a method this run does not ask for; its knobs do not matter
        if json.loads(json.dumps(now, default=str)) != rec["cache_config"]:
            raise ValueError(f"{pred_path} holds {rec['method']} predictions made with cache_config "
                             f"{rec['cache_config']}, not {now}; use another output directory for other knobs")


def _record(method, budget, sample, prediction, prompt_tokens: int, config, use: dict, seconds: float) -> dict:
    """One ``predictions.jsonl`` record (the same fields whichever generator made the prediction)."""
    return {
        "method": method, "budget": budget, "task": sample["task"], "length": sample["context_length"],
        "depth": sample["depth"], "id": sample["id"], "prediction": prediction,
        "answers": sample["answers"], "score": score_sample(prediction, sample), "metric": sample["metric"],
        "prompt_tokens": prompt_tokens, "cache_config": config,
        "budget_tokens": prompt_tokens if method == "full" else budget_tokens(budget, prompt_tokens),
        "kept_tokens": use["kept"], "read_tokens": use["read"], "full_layer_share": use["full_layer_share"],
        "context_tokens": use["context_tokens"],
        "seconds": round(seconds, 3),
    }


def _generate_with_engine(model, tokenizer, todo, cache_config, max_new_tokens, use_chat_template, progress,
                          write) -> None:
    """``--engine``: the ``todo`` samples of each (method, budget) go through the serving engine together
    (:mod:`.engine_runner`); each record is written as its knob group finishes (records say ``"engine": true``)."""
    from tqdm.auto import tqdm

    from .engine_runner import engine_generate, progress_line

    runs: dict[tuple[str, float], list[dict]] = {}
    for method, budget, sample in todo:
        runs.setdefault((method, budget), []).append(sample)
    prompts: dict[int, list[int]] = {}        # id(sample) -> token ids, tokenized once for every run
    bar = tqdm(total=len(todo), desc="generating (engine)", disable=not progress)
    done, begin = 0, time.perf_counter()

    def log(text: str) -> None:               # stderr, one line each (beside a progress bar: above it)
        if progress:
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    for (method, budget), samples in runs.items():
        start = time.perf_counter()
        for s in samples:
            if id(s) not in prompts:
                prompts[id(s)] = encode_sample(tokenizer, s, use_chat_template)[0].tolist()
        ids = [prompts[id(s)] for s in samples]
        max_new = [max_new_tokens or s["max_new_tokens"] for s in samples]
        label = method if method == "full" else f"{method} @ {budget:g}"
        tokenized = time.perf_counter() - start

        def on_batch(stats, label=label):
            log(progress_line(label, stats, done + stats["prompts"], len(todo), time.perf_counter() - begin))

        for i, prediction, config, use, seconds in engine_generate(model, tokenizer, method, budget, ids, max_new,
                                                                   cache_config, budget_to_cache_config, on_batch):
            write(dict(_record(method, budget, samples[i], prediction, len(ids[i]), config, use, seconds),
                       engine=True))
            done += 1
            bar.update(1)
        log(f"{time.strftime('%H:%M:%S')} engine: {label}: {len(samples)} prompts in "
            f"{time.perf_counter() - start:.1f} s (tokenizing {tokenized:.1f} s)")
    bar.close()


def run_eval(model, tokenizer, tasks, methods, budgets=(0.1, 0.25, 0.5), lengths=(1024,), depths=(0.0, 0.5, 1.0),
             num_samples: int = 5, seed: int = 0, output_dir="eval_out", max_new_tokens: int | None = None,
             use_chat_template="auto", progress: bool = True, longbench_dir=None,
             cache_config: dict | None = None, corpus_file=None, engine: bool = False) -> dict:
    """Evaluate ``methods`` x ``budgets`` on ``tasks`` x ``lengths`` (x ``depths`` for needle tasks).

    Grid arguments accept lists or comma-separated strings and are validated up front (``ValueError``).
    ``full`` runs once (recorded with budget 1.0); each sparse method runs once per budget. ``num_samples``
    samples per cell are built deterministically from ``seed``. ``max_new_tokens`` overrides every task's own
    generation length. ``cache_config`` adds knobs to every sparse run (e.g. ``{"deltakv_path": ...}``).
    ``corpus_file``: the text ``text_recall`` reads (default: the corpus ``examples/prepare_corpus.py`` writes).
    ``engine``: generate with the serving engine (:mod:`.engine_runner`: each (method, budget)'s prompts batched
    together, same knobs, greedy, same stop rule) instead of one ``model.generate`` call per sample.

    Writes ``predictions.jsonl``, ``summary.json``, ``summary.md`` and PNG plots into ``output_dir`` and returns
    the summary dict (``results``, ``by_depth``, ``overall``, ``config``, ``num_generated``, ``num_skipped``,
    ``files``). Only predictions of the requested grid enter the summary.
    """
    from tqdm.auto import tqdm

    tasks, methods = parse_tasks(tasks), parse_methods(methods)
    lengths, depths = parse_lengths(lengths), parse_depths(depths)
    sparse = [m for m in methods if m != "full"]
    budgets = parse_budgets(budgets) if sparse else []
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: expected an int >= 1")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    for method in sparse:  # fail on bad knobs before building any prompt
        budget_to_cache_config(method, budgets[0], 1024, cache_config)
    if engine:
        from ..engine.config import ENGINE_METHODS

        missing = [m for m in sparse if m not in ENGINE_METHODS]
        if missing:
            raise ValueError(f"engine=True: the engine does not run {', '.join(missing)} (it runs "
                             f"{', '.join(ENGINE_METHODS)}); drop --engine for those methods")
    runs = ([("full", 1.0)] if "full" in methods else []) + [(m, b) for m in sparse for b in budgets]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pred_path = output_dir / "predictions.jsonl"
    existing = read_predictions(pred_path)
    _check_same_knobs(existing, cache_config, pred_path)
    done = {record_key(r) for r in existing}

    start = time.perf_counter()
    samples = _build_all(tokenizer, tasks, lengths, depths, num_samples, seed, longbench_dir, progress, corpus_file)
    if engine:
        print(f"{time.strftime('%H:%M:%S')} eval: {len(samples)} prompts built in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    keyed = [((m, b, s["task"], s["context_length"], s["depth"], s["id"]), m, b, s) for m, b in runs for s in samples]
    grid_keys = {key for key, *_ in keyed}
    todo = [(m, b, s) for key, m, b, s in keyed if key not in done]
    encoded = {}   # id(sample) -> input ids: each prompt is tokenized once, whatever the number of runs

    model.eval()
    new_records = []
    with open(pred_path, "a", encoding="utf-8") as out:
        def write(record):
            out.write(json.dumps(record, default=str) + "\n")
            out.flush()
            new_records.append(record)

        if engine:
            _generate_with_engine(model, tokenizer, todo, cache_config, max_new_tokens, use_chat_template,
                                  progress, write)
        else:
            for method, budget, sample in tqdm(todo, desc="generating", disable=not progress):
                input_ids = encoded.get(id(sample))
                if input_ids is None:
                    input_ids = encoded[id(sample)] = encode_sample(tokenizer, sample, use_chat_template)
                config = budget_to_cache_config(method, budget, input_ids.shape[1], cache_config)
                start = time.perf_counter()
                prediction, use = generate_with_use(model, tokenizer, input_ids, method, config,
                                                    max_new_tokens or sample["max_new_tokens"])
                write(_record(method, budget, sample, prediction, int(input_ids.shape[1]), config, use,
                              time.perf_counter() - start))

    records = [r for r in existing + new_records if record_key(r) in grid_keys]
    summary = summarize(records)
    summary["config"] = {"tasks": tasks, "methods": methods, "budgets": budgets, "lengths": lengths,
                         "depths": depths, "num_samples": num_samples, "seed": seed,
                         "max_new_tokens": max_new_tokens, "use_chat_template": use_chat_template,
                         "corpus_file": None if corpus_file is None else str(corpus_file),
                         "cache_config": cache_config, "engine": engine}
    summary["num_generated"], summary["num_skipped"] = len(new_records), len(grid_keys) - len(todo)
    json_path, md_path = write_summary(summary, output_dir)
    plots = make_plots(summary, output_dir)
    summary["files"] = [str(p) for p in (pred_path, json_path, md_path, *plots)]
    return summary
