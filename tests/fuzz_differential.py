"""A seeded randomized differential fuzzer for the HF path and the engine (CPU, fp32): the pieces of
``test_fuzz_differential.py``, and a command line for long local runs.

Each case is drawn from one integer seed (:func:`draw_case`): a tiny random Llama/Qwen2/Qwen3 (layers, query and
KV heads, GQA, head dim), a method (full attention or any engine method) with random knobs (count and fraction
budgets, sinks, recent, window, pooling, selection scope, pyramid schedule, filter layers, DeltaKV's compressor and
clustering knobs), some prompts (shorter than sinks + recent, on chunk boundaries, longer than the budget), engine
knobs (``chunk_prefill_size``, ``max_num_batched_tokens``, ``max_num_seqs``, ``mixed_steps``, DeltaKV's prefill
route), arrival steps (late requests join after others have decoded), per-request ``max_tokens``,
``stop_token_ids``, EOS and ``min_tokens`` (HF: ``eos_token_id`` + ``min_new_tokens``), decoy requests that stop
early or are aborted, and model config fields (biases, tied embeddings, RoPE theta and scaling, norm eps), with
some requests sampled under a seed. :func:`check_case` then compares what the README promises is equal:

1. ``engine_vs_alone``: each request's engine output in the drawn run equals the same request alone in a fresh
   engine (greedy and seeded sampling: the output never depends on the other rows);
2. ``engine_vs_hf``: greedy engine output equals our HF path's same method and knobs, one row at a time
   (``hf_generate``: ``model.generate(..., cache_implementation=method, cache_config=knobs)``);
3. ``hf_batched_vs_rows``: the HF path on the left-padded batch equals the per-row loop, and
   ``hf_chunked_vs_whole``: with ``generate(prefill_chunk_size=...)`` (the drawn engine chunk) it equals the
   whole-prompt prefill;
4. ``unlimited_vs_dynamic``: at an unlimited budget (drawn for a fifth of the cases, every method but the lossy
   DeltaKV) the HF path equals plain ``generate`` (``DynamicCache``), batched and per row, and with beam search
   (not H2O);
5. ``hf_prompt_lookup_vs_plain``: prompt-lookup drafts (``prompt_lookup_num_tokens``) change no token of full
   attention and OmniKV at any budget, nor of StreamingLLM/SnapKV/PyramidKV/KNorm at an unlimited budget (the
   README's rule for rolling back rejected drafts);
6. ``hf_<form>_vs_dict``: the method given as a cache object, a config object or a ``SparseConfig`` gives the
   dict's tokens (a quarter of the cases);
7. ``hf_second_turn_batched_vs_rows``: a second turn (turn 1's output plus new tokens, continued from the cache
   turn 1 returned) equals the per-row loop's, and at an unlimited budget ``DynamicCache``'s (a third of the cases).

The engine's pool must also hold, after each prompt, the tokens per layer that the README's budget rule gives
(``kept_after_prompt``: sinks + recent + top, capped at the prompt; everything for full attention and OmniKV).

Greedy differences are judged by the reference's logits (``assert_greedy_equal``): a difference where the top two
logits tie within rounding is a valid greedy continuation, any other is a failure.

The pool is always roomy (``num_kv_slots`` far above what the requests need), so nothing is preempted: preemption
is a separate, documented path (recompute) with its own tests. A case that preempts is reported as a failure of the
fuzzer's set-up, not of the engine.

Command line: ``python tests/fuzz_differential.py FIRST_SEED COUNT`` prints one JSON line per failing case and a
summary; ``SPARSE_HF_FUZZ_CASES`` / ``SPARSE_HF_FUZZ_SEED`` size the pytest run.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from engine_helpers import assert_greedy_equal, hf_greedy_with_logits
from helpers import ARCHS, VOCAB
from sparse_hf.config import resolve_count
from sparse_hf.engine import LLM, SamplingParams
from sparse_hf.engine.config import ENGINE_METHODS
from sparse_hf.methods import get_method

METHODS = (None,) + ENGINE_METHODS
MAX_PROMPT = 96
#: Ample slots: every request of a case fits with room to spare, so no case preempts.
NUM_KV_SLOTS = 4096
#: ``SPARSE_HF_FUZZ_ENGINE_BACKEND=triton`` (with ``TRITON_INTERPRET=1``): the engine's batched runs use the
#: Triton attention kernels under the interpreter (slow: seconds to a minute a case), the per-request runs torch.
ENGINE_BACKEND = os.environ.get("SPARSE_HF_FUZZ_ENGINE_BACKEND")


@dataclass
class Case:
    """One drawn case: everything needed to replay it (``draw_case(seed)`` rebuilds it)."""

    seed: int
    arch: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    method: str | None
    knobs: dict
    unlimited: bool
    prompt_lengths: list[int]
    max_tokens: list[int]
    arrivals: list[int]                 # step before which each request is added (0: at the start)
    sample_seeds: list[int | None]      # None: greedy; else temperature-0.8 sampling under this seed
    stop_ids: list[list[int]]           # stop_token_ids per request (often none)
    min_tokens: list[int]               # no stop id (nor EOS) ends a request before this many tokens
    ignore_eos: list[bool]              # False: the model's EOS (``eos_id``) ends the request too
    eos_id: int                         # the model's generation_config.eos_token_id
    decoys: list[dict]                  # extra requests of the batched run only: arrive, maybe stop early or abort
    engine: dict = field(default_factory=dict)
    latent: int = 0                     # DeltaKV compressor latent size
    model_extra: dict = field(default_factory=dict)   # config fields: biases, tied embeddings, RoPE, norm eps


# -- drawing -------------------------------------------------------------------------------------------------------
def _draw_layers_list(rng: random.Random, layers: int) -> list[int]:
    return sorted({0} | {layer for layer in range(1, layers) if rng.random() < 0.35})


def _draw_budget(rng: random.Random) -> int | float:
    return rng.choice([rng.randint(0, 24), rng.randint(1, 40), round(rng.uniform(0.05, 0.6), 3), 1.0])


def _draw_knobs(rng: random.Random, method: str, layers: int, unlimited: bool) -> dict:
    sinks = rng.choice([0, 1, 2, 4, rng.randint(0, 8)])
    recent = rng.choice([0, 1, 2, 4, 8, rng.randint(1, 24)])
    knobs = dict(num_sink_tokens=sinks, num_recent_tokens=recent)
    if method != "streamingllm":
        knobs["num_top_tokens"] = _draw_budget(rng)
    if method in ("snapkv", "pyramidkv"):
        knobs["window_size"] = rng.randint(1, max(1, recent))      # recent < window_size is refused: drawn again
        knobs["pool_kernel_size"] = rng.choice([1, 3, 5, 7])
        knobs["snapkv_num_full_layers"] = rng.choice([0, 0, rng.randint(0, layers - 1)])
    if method in ("snapkv", "pyramidkv", "knorm"):
        knobs["selection_scope"] = rng.choice(["layer", "kv_head"])
    if method == "pyramidkv":
        knobs["pyramid_start_layer"] = rng.randint(0, layers - 1)
        knobs["pyramid_start_ratio"] = round(rng.uniform(0.2, 1.0), 2)
        knobs["pyramid_least_ratio"] = round(rng.uniform(0.01, knobs["pyramid_start_ratio"]), 2)
        knobs["pyramid_least_layer"] = rng.choice([None, rng.randint(knobs["pyramid_start_layer"], layers - 1)])
    if method in ("omnikv", "deltakv"):
        knobs["full_attn_layers"] = _draw_layers_list(rng, layers)
    if method == "deltakv":
        knobs["cluster_ratio"] = rng.choice([0.1, 0.25, 0.5, round(rng.uniform(0.05, 1.0), 2)])
        knobs["deltakv_neighbor_count"] = rng.randint(1, 3)
        knobs["cluster_metric"] = rng.choice(["l2", "dot", "cosine"])
        knobs["kv_quant_bits"] = rng.choice([0, 0, 4, 8])
        knobs["offload_latents"] = rng.random() < 0.25
    if unlimited:                       # nothing leaves: every method must give plain generate's tokens
        if method == "streamingllm":
            knobs["num_recent_tokens"] = 4 * MAX_PROMPT
        else:
            knobs["num_top_tokens"] = rng.choice([1.0, 4 * MAX_PROMPT])
            knobs["num_recent_tokens"] = max(recent, 48)          # H2O: the 40 decode tokens never push one out
        if method == "pyramidkv":
            knobs.update(pyramid_start_ratio=1.0, pyramid_least_ratio=1.0)
    return knobs


def _draw_length(rng: random.Random, knobs: dict, chunk: int) -> int:
    short = knobs.get("num_sink_tokens", 8) + knobs.get("num_recent_tokens", 128)
    kind = rng.randrange(4)
    if kind == 0:                                                   # shorter than sinks + recent
        n = rng.randint(1, max(1, min(short, MAX_PROMPT)))
    elif kind == 1:                                                 # on (or next to) a chunk boundary
        n = chunk * rng.randint(1, max(1, MAX_PROMPT // chunk)) + rng.choice([-1, 0, 0, 1])
    else:                                                           # anything, mostly past the budget
        n = rng.randint(1, MAX_PROMPT)
    return max(1, min(n, MAX_PROMPT))


def draw_case(seed: int) -> Case:
    """The case of ``seed`` (a valid config: knob draws the method rejects are drawn again)."""
    rng = random.Random(seed)
    arch = rng.choice(ARCHS)
    layers = rng.randint(2, 5)
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 4])
    head_dim = rng.choice([8, 16, 32])
    method = rng.choice(METHODS)
    unlimited = method not in (None, "deltakv") and rng.random() < 0.2
    knobs = {}
    if method is not None:
        for _ in range(100):
            knobs = _draw_knobs(rng, method, layers, unlimited)
            try:
                get_method(method)(get_method(method).build_config(**knobs)[0], layers)     # validates every rule
                break
            except ValueError:
                continue
        else:
            raise AssertionError(f"seed {seed}: no valid knobs for {method} in 100 draws")
    chunk = rng.choice([3, 7, 8, 16, 32, 256])
    engine = dict(chunk_prefill_size=chunk, max_num_batched_tokens=chunk * rng.choice([1, 1, 2, 3]) + rng.randint(0, 3),
                  mixed_steps=rng.random() < 0.7)
    n_req = rng.randint(1, 5)
    engine["max_num_seqs"] = rng.randint(1, n_req + 1)
    if method == "deltakv":
        engine["deltakv_prefill"] = rng.choice(["auto", "auto", "chunked", "layerwise"])
        engine["layerwise_hidden_on_host"] = rng.random() < 0.3
    lengths = [_draw_length(rng, knobs, chunk) for _ in range(n_req)]
    max_tokens = [rng.randint(1, 14) if rng.random() < 0.8 else rng.randint(15, 40) for _ in range(n_req)]
    arrivals = [0] + [rng.choice([0, rng.randint(1, 20)]) for _ in range(n_req - 1)]
    sample_seeds = [rng.randrange(1 << 16) if rng.random() < 0.25 else None for _ in range(n_req)]
    stop_ids = [rng.sample(range(1, VOCAB), rng.randint(1, 12)) if rng.random() < 0.25 else [] for _ in range(n_req)]
    ignore_eos = [rng.random() < 0.8 for _ in range(n_req)]
    min_tokens = [rng.randint(0, m) if stops or not ig else 0 for m, stops, ig in zip(max_tokens, stop_ids, ignore_eos)]
    decoys = [dict(arrival=rng.randint(0, 15), length=_draw_length(rng, knobs, chunk), max_tokens=rng.randint(1, 30),
                   abort_after=rng.choice([None, rng.randint(0, 12)]),
                   stop_ids=rng.sample(range(1, VOCAB), rng.randint(0, 12)))
              for _ in range(rng.choice([0, 0, 1, 2]))]
    model_extra = dict(tie_word_embeddings=rng.random() < 0.3, rope_theta=rng.choice([10000.0, 100.0, 1e6]),
                       rms_norm_eps=rng.choice([1e-6, 1e-5, 1e-2]))
    if arch != "qwen2":                                         # Qwen2 always has its q/k/v bias
        model_extra["attention_bias"] = rng.random() < 0.3
    rope = rng.choice([None, None, "linear", "llama3", "yarn"])
    if rope is not None:
        model_extra["rope_scaling"] = {"linear": dict(rope_type="linear", factor=2.0),
                                       "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=64),
                                       "yarn": dict(rope_type="yarn", factor=2.0,
                                                    original_max_position_embeddings=256)}[rope]
    return Case(seed, arch, layers, heads, kv_heads, head_dim, method, knobs, unlimited, lengths, max_tokens,
                arrivals, sample_seeds, stop_ids, min_tokens, ignore_eos, rng.randrange(1, VOCAB), decoys, engine,
                latent=rng.choice([8, 16]) if method == "deltakv" else 0, model_extra=model_extra)


# -- building ------------------------------------------------------------------------------------------------------
def build_model(case: Case):
    """The tiny random decoder of ``case`` (fp32, eval): hidden size ``heads * head_dim``, ``case.model_extra``'s
    config fields, random norm weights and biases."""
    torch.manual_seed(case.seed)
    hidden = case.heads * case.head_dim
    common = dict(hidden_size=hidden, num_hidden_layers=case.layers, num_attention_heads=case.heads,
                  num_key_value_heads=case.kv_heads, intermediate_size=2 * hidden, vocab_size=VOCAB,
                  max_position_embeddings=512, **case.model_extra)
    if case.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[case.arch]
        model = cls(cfg(head_dim=case.head_dim, **common))
    with torch.no_grad():              # random norm weights: Qwen3's q/k norms at 1 would give every key one norm,
        for name, p in model.named_parameters():       # so KNorm's ranking would be rounding noise
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = case.eos_id
    return model.eval()


def runtime_knobs(case: Case, model) -> dict:
    """The DeltaKV compressor (a random one of the drawn latent size, as the DeltaKV tests build it), else none."""
    if case.method != "deltakv":
        return {}
    from sparse_hf.deltakv import DeltaKVCompressor

    torch.manual_seed(case.seed + 1)
    return dict(compressor=DeltaKVCompressor.for_model(model.config, kv_compressed_size=case.latent))


def prompts_of(case: Case) -> list[list[int]]:
    g = torch.Generator().manual_seed(case.seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in case.prompt_lengths]


def params_of(case: Case, i: int) -> SamplingParams:
    seed = case.sample_seeds[i]
    stops = dict(stop_token_ids=case.stop_ids[i], min_tokens=case.min_tokens[i], ignore_eos=case.ignore_eos[i])
    if seed is None:
        return SamplingParams(temperature=0.0, max_tokens=case.max_tokens[i], **stops)
    return SamplingParams(temperature=0.8, top_p=0.9, top_k=[0, 5, 40][seed % 3], max_tokens=case.max_tokens[i],
                          seed=seed, **stops)


def make_engine(case: Case, model, runtime: dict) -> LLM:
    max_len = sum(case.prompt_lengths) + sum(d["length"] for d in case.decoys) + 48   # DeltaKV: every prompt raw
    method = dict(sparse_method=case.method, **case.knobs, **runtime) if case.method else {}
    return LLM(model, num_kv_slots=NUM_KV_SLOTS, max_model_len=max_len, **case.engine, **method)


def run_engine(case: Case, model, runtime: dict, which: list[int], arrivals: list[int],
               decoys: bool = False, kept_failures: list[str] | None = None) -> dict[int, list[int]]:
    """Requests ``which`` (request ``i`` added before step ``arrivals[k]``), plus the case's decoys if ``decoys``,
    in one fresh engine: the requests' tokens by index (the decoys' are not returned). ``kept_failures``: where to
    add :func:`kept_mismatch`'s findings (checked at each request's first token), or ``None`` (not checked).

    Raises ``AssertionError`` if a request was preempted (the pool is meant to be roomy) or the pool leaks."""
    llm = make_engine(case, model, runtime)
    if decoys and ENGINE_BACKEND:
        llm.runner.attention.backend = ENGINE_BACKEND
    prompts = prompts_of(case)
    g = torch.Generator().manual_seed(case.seed + 2)
    pending = [(at, str(i), prompts[i], params_of(case, i)) for i, at in zip(which, arrivals)]
    aborts = {}
    for k, d in enumerate(case.decoys if decoys else []):
        params = SamplingParams(temperature=0.0, max_tokens=d["max_tokens"], ignore_eos=True,
                                stop_token_ids=d["stop_ids"])
        pending.append((d["arrival"], f"decoy{k}", torch.randint(1, VOCAB, (d["length"],), generator=g).tolist(),
                        params))
        if d["abort_after"] is not None:
            aborts[f"decoy{k}"] = d["arrival"] + d["abort_after"]
    pending.sort(key=lambda e: e[0])
    outs, step = {}, 0
    while pending or llm.has_unfinished_requests():
        if not llm.has_unfinished_requests():
            step = max(step, pending[0][0])                 # idle: the next arrival comes now
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            llm.add_request(rid, prompt, params)
        for rid, at in aborts.items():
            if at == step and rid in llm.requests:
                llm.abort(rid)
        for o in llm.step():
            if kept_failures is not None and len(o.token_ids) == 1 and o.request_id in llm.requests:
                why = kept_mismatch(case, llm, o.request_id)
                if why:
                    kept_failures.append(f"kept_after_prompt {o.request_id}: {why}")
            if o.finished:
                assert o.metrics["num_preemptions"] == 0, "fuzzer set-up: a request was preempted (pool too small)"
                if not o.request_id.startswith("decoy"):
                    outs[int(o.request_id)] = o.token_ids
        step += 1
        assert step < 10_000, "engine made no progress"
    llm.pool.check_whole()
    return outs


def expected_kept(case: Case, prompt_len: int) -> list[int] | None:
    """Tokens each layer holds right after a prompt's eviction, by the README's rule for the method (``None`` for
    DeltaKV, whose raw slots follow its compression)."""
    L, c = case.layers, case.knobs
    if case.method in (None, "omnikv"):                       # full attention, or masking: nothing is freed
        return [prompt_len] * L
    if case.method == "deltakv":
        return None
    protected = c["num_sink_tokens"] + c["num_recent_tokens"]
    top = 0 if case.method == "streamingllm" else resolve_count(c["num_top_tokens"], prompt_len)
    tops = [top] * L
    if case.method == "pyramidkv":                 # the README's schedule, normalised to an average of ``top``
        start, least = c["pyramid_start_layer"], c["pyramid_least_layer"]
        least = L - 1 if least is None else min(least, L - 1)
        ratios = [1.0 if layer < start else c["pyramid_least_ratio"] if layer >= least else
                  c["pyramid_start_ratio"] + (layer - start) / max(1, least - start) *
                  (c["pyramid_least_ratio"] - c["pyramid_start_ratio"]) for layer in range(L)]
        mean = sum(ratios) / L
        tops = [int(round(top * (r / mean))) for r in ratios]       # the method's float order: .5 ties agree
    full = c.get("snapkv_num_full_layers", 0)
    return [prompt_len if layer < full else min(prompt_len, protected + t) for layer, t in enumerate(tops)]


def kept_mismatch(case: Case, llm: LLM, request_id: str) -> str | None:
    """``None`` if the engine's pool holds :func:`expected_kept` tokens per layer for the request, else why."""
    req = llm.requests[request_id]
    want = expected_kept(case, len(req.prompt_token_ids))
    if want is None:
        return None
    pool = llm.pool
    got = [int(pool.lens[pool.group_of[layer], req.row]) for layer in range(case.layers)]
    return None if got == want else f"prompt of {len(req.prompt_token_ids)} tokens: layers hold {got}, want {want}"


def hf_kwargs(case: Case, runtime: dict) -> dict:
    if case.method is None:
        return {}
    return dict(cache_implementation=case.method, cache_config=dict(case.knobs, **runtime))


def ending_ids(case: Case, i: int) -> list[int]:
    """The ids that end request ``i``: its ``stop_token_ids``, and the model's EOS unless it ignores EOS."""
    return list(case.stop_ids[i]) + ([] if case.ignore_eos[i] else [case.eos_id])


def hf_row(model, prompt: list[int], new_tokens: int, stop_ids: list[int], min_tokens: int,
           **kwargs) -> tuple[list[int], torch.Tensor]:
    """HF ``generate`` greedy on one unpadded prompt: the new tokens (ending at the first of ``stop_ids`` once
    ``min_tokens`` exist, as the engine's ``stop_token_ids`` / ``min_tokens`` do) and their logits ``[n, V]``."""
    if not stop_ids:
        return hf_greedy_with_logits(model, prompt, new_tokens, **kwargs)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop_ids,
                         min_new_tokens=min_tokens, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([x[0] for x in out.logits]).float()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max len]`` of ``prompts`` left-padded with id 0."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def hf_batched(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> list[list[int]]:
    """HF ``generate`` greedy on the left-padded batch of ``prompts`` (pad id 0, EOS ignored): the new tokens."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, **kwargs)
    return out[:, width:].tolist()


def hf_two_turns(model, prompts: list[list[int]], n1: int, extra: torch.Tensor, n2: int,
                 **kwargs) -> tuple[list[list[int]], torch.Tensor]:
    """Turn 1: greedy ``n1`` tokens on the left-padded batch; turn 2: its sequences plus ``extra [B, E]`` more
    tokens, continued for ``n2`` tokens from the cache turn 1 returned (multi-turn chat). Returns turn 2's new tokens
    per row and its logits ``[n2, B, V]``."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n1, do_sample=False, eos_token_id=None,
                           return_dict_in_generate=True, **kwargs)
    ids2 = torch.cat([first.sequences, extra], 1)
    mask2 = torch.cat([mask, torch.ones(len(prompts), ids2.shape[1] - width, dtype=torch.long)], 1)
    second = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=n2, do_sample=False,
                            eos_token_id=None, past_key_values=first.past_key_values, return_dict_in_generate=True,
                            output_logits=True)
    return second.sequences[:, ids2.shape[1]:].tolist(), torch.stack(second.logits).float()


def _greedy_mismatch(got: list[int], ref: list[int], ref_logits: torch.Tensor) -> str | None:
    """``None`` if ``got`` equals ``ref`` up to a near-tie of ``ref_logits`` (``assert_greedy_equal``), else why."""
    try:
        assert_greedy_equal(got, ref, ref_logits)
    except AssertionError as e:
        return str(e)
    return None


def _judged_mismatch(got: list[int], ref: list[int], judge: list[int], judge_logits: torch.Tensor) -> str | None:
    """Like :func:`_greedy_mismatch` where ``ref`` has no logits of its own: ``judge``'s logits decide a difference
    only where ``judge`` followed ``ref`` up to it (the same prefix, so the same logits), else any difference fails."""
    if got == ref:
        return None
    i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if i < len(got) and i < len(ref) and judge[:i + 1] == ref[:i + 1]:
        return _greedy_mismatch(got[:i + 1], ref[:i + 1], judge_logits)
    return f"first difference at step {i}: {got} vs {ref}"


def check_case(case: Case) -> list[str]:
    """Run every comparison of the module docstring on ``case``; the failures, each ``"check: why"``."""
    failures = []
    model = build_model(case)
    runtime = runtime_knobs(case, model)
    prompts = prompts_of(case)
    n = len(prompts)
    everyone = run_engine(case, model, runtime, list(range(n)), case.arrivals, decoys=True, kept_failures=failures)
    alone = {i: run_engine(case, model, runtime, [i], [0])[i] for i in range(n)}
    greedy_rows = [i for i in range(n) if case.sample_seeds[i] is None]
    new_tokens = max((case.max_tokens[i] for i in greedy_rows), default=0)
    hf = {i: hf_row(model, prompts[i], new_tokens, ending_ids(case, i), case.min_tokens[i], **hf_kwargs(case, runtime))
          for i in greedy_rows}
    plain_rows = [i for i in greedy_rows if not ending_ids(case, i)]   # the batched checks share one stop rule

    def cut(i, tokens_logits):
        tokens, logits = tokens_logits
        return tokens[:case.max_tokens[i]], logits[:case.max_tokens[i]]

    for i in range(n):                                   # 1. a request's output never depends on the other rows
        if case.sample_seeds[i] is not None:
            why = None if everyone[i] == alone[i] else f"seeded sampling: {everyone[i]} vs alone {alone[i]}"
        else:
            why = _judged_mismatch(everyone[i], alone[i], *cut(i, hf[i]))
        if why:
            failures.append(f"engine_vs_alone row {i}: {why}")
    for i in greedy_rows:                                # 2. the engine gives our HF path's tokens
        why = _greedy_mismatch(alone[i], *cut(i, hf[i]))
        if why:
            failures.append(f"engine_vs_hf row {i}: {why}")
    if len(plain_rows) > 1:                              # 3. a left-padded batch equals the per-row loop
        batched = hf_batched(model, [prompts[i] for i in plain_rows], new_tokens, **hf_kwargs(case, runtime))
        for i, got in zip(plain_rows, batched):
            why = _greedy_mismatch(got, *hf[i])
            if why:
                failures.append(f"hf_batched_vs_rows row {i}: {why}")
        chunk = case.engine["chunk_prefill_size"]
        if chunk < max(case.prompt_lengths):           # 3'. HF chunked prefill equals the whole prompt at once
            chunked = hf_batched(model, [prompts[i] for i in plain_rows], new_tokens, prefill_chunk_size=chunk,
                                 **hf_kwargs(case, runtime))
            for i, a, b in zip(plain_rows, chunked, batched):
                why = _judged_mismatch(a, b, *hf[i])
                if why:
                    failures.append(f"hf_chunked_vs_whole row {i}: {why}")
    if case.unlimited and plain_rows:                    # 4. nothing evicted: plain generate's tokens
        plain = {i: hf_greedy_with_logits(model, prompts[i], new_tokens) for i in plain_rows}
        for i in plain_rows:
            why = _greedy_mismatch(hf[i][0], *plain[i])
            if why:
                failures.append(f"unlimited_vs_dynamic row {i}: {why}")
        if len(plain_rows) > 1:
            rows = [prompts[i] for i in plain_rows]
            ours = hf_batched(model, rows, new_tokens, **hf_kwargs(case, runtime))
            ref = hf_batched(model, rows, new_tokens)
            for i, a, b in zip(plain_rows, ours, ref):
                why = _judged_mismatch(a, b, *plain[i])
                if why:
                    failures.append(f"unlimited_vs_dynamic batched row {i}: {why}")
    lookup = case.method in (None, "omnikv") or (case.unlimited and case.method not in ("h2o", "deltakv"))
    if lookup and plain_rows:                            # 5. prompt-lookup drafts change no token
        i = plain_rows[0]
        out = model.generate(torch.tensor([prompts[i]]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, prompt_lookup_num_tokens=case.seed % 4 + 1, **hf_kwargs(case, runtime))
        why = _greedy_mismatch(out[0, len(prompts[i]):].tolist(), *hf[i])
        if why:
            failures.append(f"hf_prompt_lookup_vs_plain row {i}: {why}")
    if case.unlimited and len(plain_rows) > 1 and case.method not in ("h2o", "deltakv"):   # 6. beams, unlimited
        rows = [prompts[i] for i in plain_rows]
        ours = hf_batched(model, rows, min(new_tokens, 6), num_beams=2, **hf_kwargs(case, runtime))
        ref = hf_batched(model, rows, min(new_tokens, 6), num_beams=2)
        if ours != ref:
            failures.append(f"unlimited_vs_dynamic beam search: {ours} vs {ref}")
    if case.method is not None and plain_rows and case.seed % 4 == 1:   # 8. the other ways to give the method
        i = plain_rows[0]
        from sparse_hf.hf import CACHE_CLASSES
        config, _ = get_method(case.method).build_config(**case.knobs)
        forms = {"cache object": dict(past_key_values=CACHE_CLASSES[case.method](model.config, **case.knobs,
                                                                                   **runtime)),
                 "SparseConfig": dict(cache_implementation=case.method,
                                      cache_config=sparse_hf.SparseConfig(**case.knobs, **runtime))}
        if not runtime:                                  # a method config object carries no compressor
            forms["config object"] = dict(cache_implementation=case.method, cache_config=config)
        for form, kwargs in forms.items():
            got = model.generate(torch.tensor([prompts[i]]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, **kwargs)[0, len(prompts[i]):].tolist()
            why = _greedy_mismatch(got, *hf[i])
            if why:
                failures.append(f"hf_{form.replace(' ', '_')}_vs_dict row {i}: {why}")
    if len(plain_rows) > 1 and case.seed % 3 == 0:      # 7. a second turn from the returned cache
        rows = [prompts[i] for i in plain_rows]
        g = torch.Generator().manual_seed(case.seed + 3)
        extra = torch.randint(1, VOCAB, (len(rows), 1 + case.seed % 9), generator=g)
        n1, n2 = min(new_tokens, 5), 1 + case.seed % 7
        batched, _ = hf_two_turns(model, rows, n1, extra, n2, **hf_kwargs(case, runtime))
        for k, i in enumerate(plain_rows):
            alone, logits = hf_two_turns(model, [rows[k]], n1, extra[k:k + 1], n2, **hf_kwargs(case, runtime))
            why = _greedy_mismatch(batched[k], alone[0], logits[:, 0])
            if why:
                failures.append(f"hf_second_turn_batched_vs_rows row {i}: {why}")
        if case.unlimited and case.method != "deltakv":
            ref, ref_logits = hf_two_turns(model, rows, n1, extra, n2)
            for k, i in enumerate(plain_rows):
                why = _greedy_mismatch(batched[k], ref[k], ref_logits[:, k])
                if why:
                    failures.append(f"unlimited_vs_dynamic second turn row {i}: {why}")
    return failures


def run_cases(first_seed: int, count: int, stream=None) -> list[tuple[Case, list[str]]]:
    """Check ``count`` cases from ``first_seed``; the failing ones (an exception counts as a failure)."""
    failing = []
    for seed in range(first_seed, first_seed + count):
        case = draw_case(seed)
        try:
            failures = check_case(case)
        except Exception as e:                      # noqa: BLE001  (a crash is a finding too)
            failures = [f"exception: {type(e).__name__}: {e}"]
        if stream is not None and (seed - first_seed) % 50 == 0:
            print(f"seed {seed}: {len(failing)} failing so far", file=sys.stderr, flush=True)
        if failures:
            failing.append((case, failures))
            if stream is not None:
                print(json.dumps({"case": asdict(case), "failures": failures}, default=str), file=stream, flush=True)
    return failing


if __name__ == "__main__":
    import time

    first, count = int(sys.argv[1]), int(sys.argv[2])
    start = time.time()
    bad = run_cases(first, count, sys.stdout)
    print(json.dumps({"cases": count, "first_seed": first, "failing": len(bad), "seconds": round(time.time() - start)}),
          flush=True)
