"""``sparse-hf calibrate``: choose OmniKV/DeltaKV filter layers for a model from a few calibration prompts.

OmniKV's observation (Hao et al., 2025): the tokens a layer attends to most are nearly the same over runs of
consecutive layers, so one full-attention *filter* layer can choose the tokens for the sparse layers after it. How
well it does is measured here directly, per layer pair: for each of the last ``window`` prompt queries (stand-ins
for decode queries), layer ``l``'s top-k set is the ``k`` context tokens with the highest attention probability
(per-head causal softmax, max over the query heads, as OmniKV's observer scores them); the agreement of layers
``i -> j`` is ``|T_i ∩ T_j| / k``, averaged over queries and prompts (``[num_layers, num_layers]``).

Choosing ``n`` filter layers (layer 0 always one): each sparse layer ``j`` reads the selection of the last filter
layer ``i < j`` before it, so a choice is worth ``sum_j A[obs(j), j]`` over the sparse layers plus 1 per filter
layer (it reads everything). A dynamic programme over segments finds the best choice exactly.

The result is written as a ``cache_config`` file, ``{"full_attn_layers": [...]}``, which every entry point loads:
``sparse-hf generate/eval --cache-config @calibration.json``, ``cache_config=json.load(f)`` on the HF path, and
``LLM(model, sparse_method="omnikv", **json.load(f))`` in the engine; the per-layer table goes beside it
(``<name>.agreement.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CALIBRATE_HELP = "choose OmniKV/DeltaKV filter layers from the per-layer agreement of top-k token sets"
ATTN_NAME = "sparse_hf_calibrate"


# ------------------------------------------------------------------------------------------------ measurement
class _Recorder:
    """Attention function that runs SDPA and records, per layer, the window queries' scores of the context."""

    def __init__(self, window: int):
        self.window = window
        self.scores: dict[int, "torch.Tensor"] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
        self.scores[module.layer_idx] = window_scores(query, repeat_kv(key, query.shape[1] // key.shape[1]),
                                                      scaling, self.window)
        return out


def window_scores(query, keys, scaling: float, window: int):
    """Observer scores of the context for each of the last ``window`` queries.

    Args:
        query: ``[B, H, L, D]`` post-RoPE queries of the whole prompt; keys: ``[B, H, L, D]`` (repeated per head).
        scaling: softmax scale; window: how many of the last queries to score with.

    Returns:
        ``[B, W, L - W]`` float32: per query, the causal softmax over all its keys, max over the heads, restricted
        to the context before the window (the same candidates for every window query).
    """
    import torch

    L = query.shape[2]
    q = query[:, :, L - window:].float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling                       # [B, H, W, L]
    q_cols = torch.arange(L - window, L, device=query.device).view(-1, 1)
    logits = logits.masked_fill(torch.arange(L, device=query.device).view(1, -1) > q_cols, float("-inf"))
    return logits.softmax(-1).amax(1)[..., :L - window].cpu()


def layer_scores(model, input_ids, window: int) -> list:
    """Per layer, :func:`window_scores` of one prompt ``input_ids [1, L]`` (one forward pass)."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    recorder = _Recorder(window)
    AttentionInterface.register(ATTN_NAME, recorder)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [recorder.scores[i] for i in range(len(recorder.scores))]


def topk_masks(scores, k: int):
    """``[N, C]`` scores -> ``[N, C]`` bool, the ``k`` best of each row (ties: the earlier token)."""
    import torch

    order = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def agreement_matrix(per_prompt_scores: list[list], num_top_tokens: int | float):
    """``A [num_layers, num_layers]`` float64: ``A[i, j]`` = mean over prompts and window queries of
    ``|top-k(i) ∩ top-k(j)| / k`` (``k`` resolved against each prompt's context length), and the ``k`` used."""
    import torch

    from .config import resolve_count

    num_layers = len(per_prompt_scores[0])
    total = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    count, ks = 0, []
    for layers in per_prompt_scores:
        context = layers[0].shape[-1]
        k = max(1, min(context, resolve_count(num_top_tokens, context)))
        ks.append(k)
        masks = torch.stack([topk_masks(s.reshape(-1, context), k) for s in layers]).double()   # [layers, N, C]
        total += torch.einsum("inc,jnc->ij", masks, masks) / k
        count += masks.shape[1]
    return total / count, ks


# ----------------------------------------------------------------------------------------------------- choice
def choice_value(agreement, filter_layers) -> float:
    """``sum`` over layers: 1 for a filter layer, ``A[observer, j]`` for a sparse layer ``j`` (its observer: the
    last filter layer before it)."""
    value, observer = 0.0, None
    for j in range(agreement.shape[0]):
        if j in filter_layers:
            value, observer = value + 1.0, j
        else:
            value += float(agreement[observer, j])
    return value


def choose_filter_layers(agreement, num_filter_layers: int, include=()) -> list[int]:
    """The ``num_filter_layers`` filter layers (layer 0 and every layer of ``include`` among them) of the highest
    :func:`choice_value`.

    ``include`` pins layers that must stay full whatever their agreement: for DeltaKV, the layers whose
    compression moves the output most (:mod:`sparse_hf.calibrate_deltakv`; on Qwen, compressing layer 16 took
    DeltaKV from 0.93 to 0.78 of the full cache where OmniKV's selection lost nothing, `docs/accuracy.md`). Exact, by dynamic programming over segments: a
    filter layer ``i`` serves the sparse layers up to the next filter layer ``e`` (no pinned layer between them),
    worth ``1 + sum_{i<j<e} A[i, j]``."""
    n_layers = agreement.shape[0]
    if not 1 <= num_filter_layers <= n_layers:
        raise ValueError(f"num_filter_layers={num_filter_layers}: expected 1..{n_layers}")
    pinned = sorted({0, *include})
    if pinned[-1] >= n_layers:
        raise ValueError(f"include={list(include)}: the model has {n_layers} layers (0..{n_layers - 1})")
    if len(pinned) > num_filter_layers:
        raise ValueError(f"include={list(include)} pins {len(pinned)} filter layers (layer 0 counted), more than "
                         f"num_filter_layers={num_filter_layers}")
    A = agreement.tolist()
    # next_pinned[i]: the first pinned layer after i (n_layers if none): a segment from i may not pass it
    next_pinned = [next((p for p in pinned if p > i), n_layers) for i in range(n_layers)]

    def segment(i, e):
        if e > next_pinned[i]:
            return float("-inf")
        return 1.0 + sum(A[i][j] for j in range(i + 1, e))

    # best[n][i]: the best value of layers i.. with layer i a filter layer and n filter layers from i on
    best = [[float("-inf")] * n_layers for _ in range(num_filter_layers + 1)]
    nxt = [[None] * n_layers for _ in range(num_filter_layers + 1)]
    for i in range(n_layers):
        best[1][i] = segment(i, n_layers)
    for n in range(2, num_filter_layers + 1):
        for i in range(n_layers):
            for e in range(i + 1, n_layers):
                value = segment(i, e) + best[n - 1][e]
                if value > best[n][i] + 1e-12:
                    best[n][i], nxt[n][i] = value, e
    layers, i, n = [0], 0, num_filter_layers
    while n > 1:
        i = nxt[n][i]
        layers.append(i)
        n -= 1
    return layers


def default_filter_layers(num_layers: int) -> list[int]:
    """The reference default ``full_attn_layers``, cut to the model's depth."""
    from .config import DEFAULT_FULL_ATTN_LAYERS

    return [layer for layer in DEFAULT_FULL_ATTN_LAYERS if layer < num_layers]


def calibrate(model, prompts: list, num_top_tokens: int | float = 0.1, window: int = 16,
              num_filter_layers: int | None = None, include=(), deltakv_compressor=None,
              pin_sensitive: int = 1, progress: bool = False) -> dict:
    """Measure the agreement on ``prompts`` (token id tensors ``[1, L]``) and choose the filter layers.

    With ``deltakv_compressor`` (a ``DeltaKVCompressor`` or a ``deltakv_path``), each layer's compression
    sensitivity is measured too (:func:`sparse_hf.calibrate_deltakv.compression_sensitivity`) and the
    ``pin_sensitive`` most sensitive layers are pinned as filter layers beside ``include``.

    Returns ``{"full_attn_layers", "agreement" (list of lists), "per_layer" (rows of the table), "default",
    "value", "default_value", "num_prompts", "k", "window", "num_top_tokens", "pinned"}`` (plus
    ``"deltakv_sensitivity"``, ``{layer: KL}``, with a compressor)."""
    per_prompt = []
    for ids in prompts:
        if ids.shape[-1] <= window + 1:
            raise ValueError(f"a calibration prompt of {ids.shape[-1]} tokens is too short for window={window}")
        per_prompt.append(layer_scores(model, ids, window))
    agreement, ks = agreement_matrix(per_prompt, num_top_tokens)
    n_layers = agreement.shape[0]
    sensitivity = None
    pinned = sorted({0, *include})
    if deltakv_compressor is not None:
        from .calibrate_deltakv import compression_sensitivity, most_sensitive

        sensitivity = compression_sensitivity(model, prompts, deltakv_compressor, window, progress=progress)
        pinned = sorted({*pinned, *most_sensitive(sensitivity, pin_sensitive)})
    default = default_filter_layers(n_layers)
    n_filter = num_filter_layers or max(min(len(default), n_layers - 1) or 1, len(pinned))
    chosen = choose_filter_layers(agreement, n_filter, pinned)
    rows = []
    for i in range(n_layers):
        following = [float(agreement[i, j]) for j in range(i + 1, n_layers)]
        rows.append({"layer": i, "next": following[0] if following else None,
                     "following_mean": sum(following) / len(following) if following else None,
                     "chosen": i in chosen, "default": i in default,
                     "deltakv_kl": None if sensitivity is None else sensitivity.get(i)})
    result = {"full_attn_layers": chosen, "agreement": agreement.tolist(), "per_layer": rows, "default": default,
              "value": choice_value(agreement, set(chosen)), "default_value": choice_value(agreement, set(default)),
              "num_prompts": len(prompts), "k": ks, "window": window, "num_top_tokens": num_top_tokens,
              "pinned": pinned}
    if sensitivity is not None:
        result["deltakv_sensitivity"] = {str(layer): kl for layer, kl in sensitivity.items()}
    return result


def format_table(result: dict) -> str:
    """The per-layer agreement table (text), then the choice against the default."""
    probed = "deltakv_sensitivity" in result
    head = "layer | agreement with the next layer | mean agreement with the following layers | chosen | default"
    lines = [head + (" | deltakv KL when compressed alone" if probed else ""), "---|---|---|---|---" + ("|---" if probed else "")]
    for r in result["per_layer"]:
        nxt = "-" if r["next"] is None else f"{r['next']:.3f}"
        mean = "-" if r["following_mean"] is None else f"{r['following_mean']:.3f}"
        line = f"{r['layer']} | {nxt} | {mean} | {'*' if r['chosen'] else ''} | {'*' if r['default'] else ''}"
        if probed:
            kl = r.get("deltakv_kl")
            line += " | " + ("-" if kl is None else f"{kl:.4f}" + (" (pinned)" if r["layer"] in result["pinned"] else ""))
        lines.append(line)
    n = len(result["per_layer"])
    lines.append(f"chosen full_attn_layers {result['full_attn_layers']}: mean agreement read by a layer "
                 f"{result['value'] / n:.3f}; default {result['default']}: {result['default_value'] / n:.3f} "
                 f"({result['num_prompts']} prompts, k={sorted(set(result['k']))}, window {result['window']})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- CLI
def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    from .cli import argtype, positive_int
    from .eval.grid import parse_lengths

    p = sub.add_parser("calibrate", help=CALIBRATE_HELP, description=CALIBRATE_HELP + ". " + __doc__.split("\n\n")[2])
    p.add_argument("--model", required=True,
                   help="a Hugging Face model folder, a Hub id (org/name), 'demo' or 'qwen-coder'")
    p.add_argument("--output", default="calibration.json",
                   help="the cache_config file to write, {\"full_attn_layers\": [...]} (default: calibration.json); "
                        "the agreement table goes to <name>.agreement.json beside it")
    p.add_argument("--prompts-file", default=None,
                   help="calibration text: a .jsonl file with a \"text\" field per line (e.g. the corpus of "
                        "examples/prepare_corpus.py) or a plain text file (default: synthetic eval prompts)")
    p.add_argument("--tasks", default="niah_multikey,ruler_vt",
                   help="synthetic eval tasks to build prompts from when no --prompts-file (default: "
                        "niah_multikey,ruler_vt)")
    p.add_argument("--append-answers", action="store_true",
                   help="with synthetic prompts: append each sample's reference answer, so that the scoring queries "
                        "(the last --window tokens) are the answer's own tokens, the decode steps of a retrieval or "
                        "copy task, rather than the prompt's last ones")
    p.add_argument("--num-prompts", default=4, type=argtype(positive_int), help="prompts per task, or texts read from --prompts-file (default: 4)")
    p.add_argument("--length", default="2048", type=argtype(lambda t: parse_lengths(t)[0]),
                   help="tokens per prompt (default: 2048)")
    p.add_argument("--window", default=16, type=argtype(positive_int),
                   help="last prompt queries that score the tokens (default: 16)")
    p.add_argument("--num-top-tokens", default="0.1", type=argtype(_budget),
                   help="k of the top-k sets: a count, or a fraction of the context (default: 0.1)")
    p.add_argument("--num-filter-layers", default=None, type=argtype(positive_int),
                   help="filter layers to choose, layer 0 included (default: as many as the default "
                        "full_attn_layers has at this depth)")
    p.add_argument("--include-layers", default=None, type=argtype(_layer_list),
                   help="filter layers to keep whatever their agreement, e.g. '0,16' (for DeltaKV: layers its "
                        "compressor rebuilds badly; --deltakv-path finds them; default: layer 0 only)")
    p.add_argument("--deltakv-path", default=None,
                   help="choose for DeltaKV with this compressor (a folder, or a shipped name: demo, qwen-coder): "
                        "also measure how much compressing each layer alone changes the output, and pin the most "
                        "sensitive layers as filter layers (slower: one prefill per layer and prompt)")
    p.add_argument("--pin-sensitive", default=None, type=argtype(positive_int),
                   help="with --deltakv-path: how many of the most sensitive layers to pin (default: 1)")
    p.add_argument("--save-compressor", default=None, metavar="DIR",
                   help="with --deltakv-path: also save a copy of the compressor into the new folder DIR with the "
                        "chosen filter layers recorded in its config (deltakv_path=DIR then serves with them unless "
                        "full_attn_layers is given) and in its model card")
    p.add_argument("--seed", default=0, type=int, help="seed of the synthetic prompts (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    return p


def _layer_list(text: str) -> list[int]:
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"{text!r}: expected layer numbers like '0,1,2,3'") from None
    if not layers or layers[0] < 0:
        raise ValueError(f"{text!r}: expected layer numbers >= 0 like '0,1,2,3'")
    return layers


def _budget(text: str):
    from .config import check_budget

    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r}: expected a count (int) or a fraction in (0, 1]") from None
    return check_budget("--num-top-tokens", value)


def _check_args(args) -> None:
    """Every check that needs no model: one-line ``UsageError``s."""
    from .cli import UsageError, check_model_arg, model_num_layers
    from .eval.tasks import parse_tasks

    check_model_arg(args.model)
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise UsageError(f"--output {args.output}: is a folder; pass a file name such as calibration.json")
    if not out.parent.is_dir():
        raise UsageError(f"--output {args.output}: folder {out.parent} does not exist")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise UsageError(f"--prompts-file {args.prompts_file}: no such file")
    if args.append_answers and args.prompts_file is not None:
        raise UsageError("--append-answers needs synthetic prompts (--tasks): a --prompts-file has no answers")
    if args.prompts_file is None:
        try:
            args.tasks = parse_tasks(args.tasks)
        except ValueError as exc:
            raise UsageError(f"--tasks: {exc}") from None
    if args.window >= args.length:
        raise UsageError(f"--window {args.window} must be smaller than --length {args.length}")
    layers = model_num_layers(args.model)
    if layers is not None and args.num_filter_layers is not None and args.num_filter_layers >= layers:
        raise UsageError(f"--num-filter-layers {args.num_filter_layers}: the model has {layers} layers; choose "
                         "fewer (every layer a filter layer leaves nothing sparse)")
    if args.pin_sensitive is not None and args.deltakv_path is None:
        raise UsageError("--pin-sensitive needs --deltakv-path (the compressor whose sensitivity is measured)")
    if args.save_compressor is not None:
        if args.deltakv_path is None:
            raise UsageError("--save-compressor needs --deltakv-path (the compressor to save with the chosen layers)")
        target = Path(args.save_compressor).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UsageError(f"--save-compressor {args.save_compressor}: exists and is not an empty folder")
        if not target.parent.is_dir():
            raise UsageError(f"--save-compressor {args.save_compressor}: folder {target.parent} does not exist")
    if args.deltakv_path is not None:
        from .deltakv.demo import SHIPPED_COMPRESSORS

        path = args.deltakv_path
        hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if path not in SHIPPED_COMPRESSORS and not Path(path).expanduser().is_dir() and not hub_id:
            raise UsageError(f"--deltakv-path {path}: no such compressor folder (or shipped name: "
                             f"{', '.join(sorted(SHIPPED_COMPRESSORS))})")
    pinned = sorted({0, *(args.include_layers or ())})
    if layers is not None and pinned[-1] >= layers:
        raise UsageError(f"--include-layers: layer {pinned[-1]} out of range, the model has {layers} layers")
    if args.num_filter_layers is not None and len(pinned) > args.num_filter_layers:
        raise UsageError(f"--include-layers pins {len(pinned)} filter layers (layer 0 counted), more than "
                         f"--num-filter-layers {args.num_filter_layers}")


def _read_prompt_texts(path: str, limit: int) -> list[str]:
    from .cli import UsageError, read_text_file

    text = read_text_file(path, "--prompts-file")
    if path.endswith(".jsonl"):
        texts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"--prompts-file {path}:{lineno}: expected a JSON object with a \"text\" "
                                     "field") from None
    else:
        texts = [text]
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise UsageError(f"--prompts-file {path}: no text in it")
    return texts


def build_prompts(args, tokenizer) -> list:
    """Token id tensors ``[1, <= length]``: the file's texts (truncated), or synthetic eval samples (with
    ``--append-answers``, each followed by its reference answer's tokens)."""
    import torch

    if args.prompts_file is not None:
        texts = _read_prompt_texts(args.prompts_file, args.num_prompts)
        return [tokenizer(t, return_tensors="pt")["input_ids"][:, :args.length] for t in texts]
    from .eval.runner import encode_sample
    from .eval.tasks import build_samples, is_needle

    prompts = []
    for task in args.tasks:
        samples = build_samples(task, tokenizer, args.length, args.num_prompts, args.seed,
                                0.5 if is_needle(task) else None, allow_download=False)
        for s in samples:
            ids = encode_sample(tokenizer, s, use_chat_template=False)
            if args.append_answers:                         # teacher-forced: the window's queries are the answer's
                answer = tokenizer(" " + ", ".join(s["answers"]), add_special_tokens=False, return_tensors="pt")
                ids = torch.cat([ids, answer["input_ids"]], 1)
            prompts.append(ids)
    return prompts


def run_calibrate_command(args) -> int:
    from .cli import UsageError, check_device, error_exit

    try:
        _check_args(args)
        check_device(args.device)
    except UsageError as exc:
        return error_exit(str(exc), "calibrate")
    import torch

    from .models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = load_model(args.model, torch.bfloat16 if device.startswith("cuda") else None, device)
        prompts = build_prompts(args, tokenizer)
        n_layers = model.config.get_text_config().num_hidden_layers
        if args.num_filter_layers is not None and args.num_filter_layers >= n_layers:
            raise UsageError(f"--num-filter-layers {args.num_filter_layers}: the model has {n_layers} layers")
        compressor = None
        if args.deltakv_path is not None:
            from .deltakv.compressor import DeltaKVCompressor
            from .deltakv.demo import resolve_compressor_path

            compressor = DeltaKVCompressor.from_pretrained(resolve_compressor_path(args.deltakv_path))
            compressor.check_compatible(model.config)
        result = calibrate(model, prompts, args.num_top_tokens, args.window, args.num_filter_layers,
                           args.include_layers or (), compressor, args.pin_sensitive or 1, progress=True)
    except (ValueError, OSError) as exc:
        return error_exit(str(exc), "calibrate")
    print(format_table(result))
    out = Path(args.output).expanduser()
    out.write_text(json.dumps({"full_attn_layers": result["full_attn_layers"]}) + "\n")
    details = out.with_name(out.stem + ".agreement.json")
    details.write_text(json.dumps(dict(result, model=args.model, length=args.length), indent=1) + "\n")
    print(f"wrote {out} (use: --cache-config @{out}) and {details}")
    if args.save_compressor is not None:
        compressor.save_pretrained(args.save_compressor, full_attn_layers=result["full_attn_layers"])
        print(f"saved the compressor with full_attn_layers={result['full_attn_layers']} to {args.save_compressor} "
              f"(use: deltakv_path={args.save_compressor!r})")
    return 0
