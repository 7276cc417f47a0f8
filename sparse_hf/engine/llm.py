"""``LLM``: the user API of the engine (``generate`` for batches; ``add_request``/``step``/``abort`` for streaming).

    llm = LLM("path/to/model", sparse_method="snapkv", num_top_tokens=2048)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import gc
import itertools
import time

import torch

from ..kernels.capture import release_library_workspaces
from .config import EngineConfig, build_method, default_dtype
from .request import Request, RequestOutput
from .deltakv_layerwise import layerwise_route, plan_layerwise
from .decode_ahead import TokenReader, can_decode_ahead, launch_ahead, still_running, take_in_flight
from .runner import plan_decode, plan_mixed, plan_prefill
from .scheduler import Scheduler
from .tp import check_divisible, launched_by_torchrun
from .weights import iter_safetensors
from .worker import EngineSpec, build_shard, pool_report

from .output import OutputProcessor
from .sampler import Sampler
from .sampling_params import SamplingParams

def _load_source(model, tokenizer):
    """``(hf_config, tensors, tokenizer, eos_ids)`` from a directory, an in-memory transformers model, or a
    transformers config (random weights, for benchmarks: ``tensors`` is ``None``)."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        hf_config, tensors, eos = model, None, None
    elif isinstance(model, str):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        hf_config = AutoConfig.from_pretrained(model)
        tensors = iter_safetensors(model)
        if tokenizer is None or isinstance(tokenizer, str):
            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
            except (OSError, ValueError):
                tokenizer = None                 # token-id prompts still work
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:
            eos = None
    elif isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        hf_config = model.config
        tensors = model.state_dict().items()
        gen = getattr(model, "generation_config", None)
        eos = gen.eos_token_id if gen is not None else None
    else:
        raise TypeError(f"model must be a model directory, a transformers model or a config (random weights), got "
                        f"{type(model).__name__}")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return hf_config, tensors, tokenizer, eos_ids


def _weights_for_ranks(model, tensors, tp_size: int):
    """The weights as :class:`~.worker.EngineSpec` carries them: a model directory stays a path (every rank reads
    its share from disk); an in-memory model's tensors become a dict (copied to the CPU when other ranks need them)."""
    if tensors is None or isinstance(model, str):
        return model if isinstance(model, str) else None
    if tp_size == 1:
        return dict(tensors)
    return {name: t.detach().cpu() for name, t in tensors}


def _start_ranks(spec, tp_size: int, device: torch.device):
    """Start (spawn) or join (torchrun) the tensor-parallel group. Returns ``(TPGroup, Driver, device)`` on rank 0;
    on the other ranks of a torchrun launch it serves rank 0 and then ends the process."""
    from .tp import Driver, init_groups, rank_device, start_spawned

    if not launched_by_torchrun():
        tp, driver = start_spawned(spec, tp_size, device)
        device = rank_device(device, 0, torchrun=False)
        if device.type == "cuda":
            torch.cuda.set_device(device)            # the rendezvous ran in a helper thread
        return tp, driver, device
    import os
    import sys

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != tp_size:
        raise ValueError(f"launched by torchrun with {world} ranks but tensor_parallel_size={tp_size}: the engine "
                         f"takes the whole launch; use torchrun --nproc-per-node {tp_size} (times nodes) or "
                         f"tensor_parallel_size={world}")
    if rank != 0:
        from .worker import run_worker

        run_worker(rank, tp_size, None, spec, torchrun=True)
        sys.exit(0)
    device = rank_device(device, 0, torchrun=True)
    tp = init_groups(0, tp_size, device, None)
    return tp, Driver(tp), device


def _sampling_rows(stepped: list, logits):
    """``(requests, logits [R, V])`` of the rows of a step that get a new token: ``stepped`` (one per logits row)
    less a replaying request's prompt and replayed tokens (:class:`~.request.Request`), whose logits are dropped:
    nothing is sampled, appended, checked for a stop or streamed for them."""
    done = [r for r in stepped if r.samples]
    if len(done) == len(stepped) or logits is None:
        return done, logits
    keep = [i for i, r in enumerate(stepped) if r.samples]
    return done, logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]


class _NoText:
    """Stands in for a tokenizer when there is none (token-id prompts): every text is empty."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def _default_device(model) -> torch.device:
    """An in-memory model's own device (a CPU model stays on the CPU); else CUDA when there is one."""
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_model_dtype(model, device: torch.device) -> torch.dtype:
    """An in-memory model's own floating dtype (an fp32 model runs in fp32, as it does under HF ``generate``: the
    engine never silently computes in a lower precision than the model it was given); else
    :func:`~.config.default_dtype` for the device (bf16 on CUDA, fp32 on CPU)."""
    if isinstance(model, torch.nn.Module):
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None:
            return param.dtype
    return default_dtype(device)


class LLM:
    """A serving engine over one device, or over ``tensor_parallel_size`` devices (one process per rank, heads
    split across ranks; see :mod:`.tp`). See :class:`~.config.EngineConfig` for the knobs; ``sparse_knobs`` are
    the HF path's ``cache_config`` names (``num_top_tokens``, ``window_size``, ...).

    Tensor parallelism: with ``tensor_parallel_size=N`` the engine spawns ranks ``1..N-1`` itself (rank 0, this
    process, runs the scheduler and the sampler; the script needs an ``if __name__ == "__main__":`` guard, as for
    any spawned process). Under ``torchrun --nproc-per-node N`` (or across nodes) every rank runs the same script:
    on rank 0 ``LLM(...)`` returns the engine, on the other ranks it serves rank 0 until the engine is closed and
    then exits the process (code after ``LLM(...)`` runs on rank 0 only). ``tp_selection``: ``"exact"`` (default:
    selections spanning heads on several ranks all-reduce their scores first, so TP=N outputs what TP=1 does) or
    ``"per_rank"`` (each rank selects from its own heads; see :data:`~.config.TP_SELECTIONS`)."""

    def __init__(self, model, tokenizer=None, *, dtype=None, device=None, max_model_len=None,
                 gpu_memory_utilization=0.9, max_num_seqs=64, max_num_batched_tokens=8192, chunk_prefill_size=2048,
                 enforce_eager=False, num_kv_slots=None, sparse_method=None, tensor_parallel_size=1,
                 tp_selection="exact", mixed_steps=True, deltakv_prefill="auto", layerwise_hidden_on_host=False,
                 **sparse_knobs):
        self.config = EngineConfig(max_model_len, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens,
                                   min(chunk_prefill_size, max_num_batched_tokens), enforce_eager, num_kv_slots,
                                   sparse_method, tp_selection, mixed_steps, deltakv_prefill,
                                   layerwise_hidden_on_host)
        hf_config, tensors, self.tokenizer, self.eos_token_ids = _load_source(model, tokenizer)
        device = torch.device(device) if device is not None else _default_device(model)
        self.dtype = dtype or _default_model_dtype(model, device)
        spec = EngineSpec(hf_config, _weights_for_ranks(model, tensors, tensor_parallel_size), self.config,
                          dict(sparse_knobs), self.dtype, str(device),
                          self.config.max_model_len or hf_config.max_position_embeddings)
        self.tp, self.driver = None, None
        if tensor_parallel_size != 1:
            check_divisible(hf_config, tensor_parallel_size)
            build_method(sparse_method, sparse_knobs, hf_config.num_hidden_layers)   # bad knobs fail before spawning
            self.tp, self.driver, device = _start_ranks(spec, tensor_parallel_size, device)
        self.device = device
        try:
            shard = build_shard(spec, device, self.tp) if self.driver is None else self.driver.guarded(
                build_shard, spec, device, self.tp)
        except BaseException:
            if self.driver is not None:
                self.driver.stop()
            raise
        self.model, self.pool, self.runner, self.method = shard.model, shard.pool, shard.runner, shard.method
        self.max_model_len = shard.max_model_len
        if self.driver is not None:
            self.pool.released = []                 # rows freed on rank 0 go to the other ranks with the next step
        self.scheduler = Scheduler(self.config, self.pool, layerwise_route(self.config, self.pool, self.method))
        self.sampler = Sampler()
        self.output_processor = OutputProcessor(self.tokenizer or _NoText(), self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        #: Launch a decode step before the previous one's tokens are read (:mod:`.decode_ahead`); CUDA graphs only.
        self.decode_ahead = self.device.type == "cuda" and self.driver is None
        self.in_flight = None
        self.token_reader = TokenReader(self.config.max_num_seqs, self.device)
        self._ids = itertools.count()

    @property
    def tensor_parallel_size(self) -> int:
        return 1 if self.tp is None else self.tp.size

    # -- requests --------------------------------------------------------------------------------------------
    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return ids

    def add_request(self, request_id: str, prompt, params=None) -> None:
        """Queue a prompt (text or token ids). A prompt that can never fit raises ``ValueError``."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("empty prompt")
        self._check_fits(len(ids))
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len="
                             f"{self.max_model_len}; raise max_model_len or shorten the prompt")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        req = Request(request_id, ids, params)
        req.text_state = self.output_processor.new_state(ids, params, max_total_len=self.max_model_len)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def _check_fits(self, n: int) -> None:
        """Raise ``ValueError`` (naming the knobs) when a prompt of ``n`` tokens can never fit the empty pool."""
        route = self.scheduler.layerwise
        if route is not None and route.takes(n):           # DeltaKV, layer-wise: per group (filter, compressed)
            need, room = route.slots(n), self.pool.group_slots
            if all(k + 1 <= r for k, r in zip(need, room)):
                return
            raise ValueError(f"prompt of {n} tokens can never fit the KV pool: its layer-wise prefill needs {n + 1} "
                             f"slots in deltakv's filter layers, which hold {room[0]}; raise num_kv_slots or "
                             "gpu_memory_utilization, or lower max_num_seqs / max_model_len")
        if n + 1 > self.pool.num_slots:
            hint = ""
            if self.method is not None and self.method.name == "deltakv" and self.config.deltakv_prefill == "chunked":
                hint = (" (deltakv_prefill='chunked' holds a whole prompt raw in every layer; 'auto' or 'layerwise' "
                        "prefills long prompts layer by layer and holds longer ones)")
            raise ValueError(f"prompt of {n} tokens can never fit the KV pool of {self.pool.num_slots} slots per layer"
                             f"{hint}; raise num_kv_slots or gpu_memory_utilization, or lower max_num_seqs / "
                             "max_model_len")

    def abort(self, request_id: str) -> None:
        """Stop a request now; its slots return to the pool and the next ``step()`` reports it (``"abort"``)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.release(req)
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        req.finish_reason = "abort"
        self.output_processor.finish(req.text_state, "abort")
        self._aborted.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    def stats(self) -> dict:
        pool = self.pool
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_slots_per_layer": pool.num_slots, "kv_free_slots": pool.num_free(),
                "kv_used_tokens_all_layers": pool.used_slots(),
                "kv_usage": pool.used_slots() / pool.total_slots()}

    # -- stepping --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that got a token, finished or were aborted since the last step."""
        outputs = [r.output() for r in self._aborted]
        self._aborted.clear()
        ahead = take_in_flight(self)
        if ahead is not None:                       # the decode step launched during the previous step()
            kind, (done, logits) = "ahead", ahead   # (never with a replaying row: can_decode_ahead)
            for req in done:
                if still_running(self, req):
                    req.num_computed += 1
                    req.kept_kv_tokens = self.pool.row_tokens(req.row)
        else:
            kind, batch = self.scheduler.schedule()
            chunks, decoding = {"prefill": (batch, []), "decode": ([], batch), "mixed": batch}.get(kind, ([], []))
            if kind == "layerwise":                  # one whole prompt, layer by layer (decode rows wait)
                chunks = [(batch, batch.prefill_end)]
                logits = self._run(plan_layerwise(batch, self.config))
            elif kind == "prefill":
                logits = self._run(plan_prefill(chunks))
            elif kind == "decode":
                logits = self._run(plan_decode(decoding))
            elif kind == "mixed":
                logits = self._run(plan_mixed(chunks, decoding))      # logits: completed prompts, then decode rows
            else:
                return outputs
            for req, n in chunks:
                req.num_computed += n
            stepped = [req for req, _ in chunks if req.num_computed == req.prefill_end]    # the logits' rows
            for req in decoding:
                req.num_computed += 1
            stepped += decoding
            for req in stepped:
                req.kept_kv_tokens = self.pool.row_tokens(req.row)
            done, logits = _sampling_rows(stepped, logits)
        if done:
            params = [r.params for r in done]
            steps = torch.tensor([len(r.output_token_ids) for r in done])          # host: no blocking copy
            sampled = self.sampler(logits, params, steps, self.eos_token_ids)      # [B] on the device
            if kind in ("decode", "ahead") and self.decode_ahead and can_decode_ahead(self, done):
                self.token_reader.start(sampled)                   # queued before the next step, not after it
                self.in_flight = launch_ahead(self, done, sampled)                 # before reading the tokens
                tokens = self.token_reader.read()
            else:
                tokens = sampled.tolist()
            now = time.perf_counter()
            for req, token in zip(done, tokens):
                if kind == "ahead" and not still_running(self, req):
                    continue                        # finished or aborted after this step was launched
                self._append(req, int(token), now)
                outputs.append(req.output())
        return outputs

    def _run(self, plan):
        """Run a step's plan here and, under tensor parallelism, on every other rank (sent first)."""
        if self.driver is None:
            return self.runner.run(plan)
        self.driver.send_step(self.pool.take_released(), plan)
        return self.driver.guarded(self.runner.run, plan)

    def check_pool_whole(self) -> None:
        """Raise ``AssertionError`` unless the KV pool is whole (every slot free once) on every rank."""
        if self.driver is None:
            self.pool.check_whole()
            return
        reports = self.driver.call(self.pool.take_released(), "pool_report", pool_report(self.runner))
        bad = {rank: r for rank, r in enumerate(reports) if r is not None}
        assert not bad, f"KV pool not whole on ranks {bad}"

    def _append(self, req: Request, token: int, now: float) -> None:
        """Record a sampled token; the output processor decides the text and whether the request ends."""
        req.output_token_ids.append(token)
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        _, finished, reason = self.output_processor.update(req.text_state, token)
        req.text = req.text_state.text
        if finished:
            req.finish_reason = reason
            req.kept_kv_tokens = self.pool.row_tokens(req.row) if req.row is not None else 0
            self.scheduler.release(req)
            self.requests.pop(req.request_id, None)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` (texts or token-id lists) to completion; outputs in prompt order.

        ``sampling_params``: one for all prompts, a list (one per prompt) or ``None`` (defaults)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, (list, tuple)):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, params in zip(ids, prompts, sampling_params):
            self.add_request(rid, prompt, params)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(prompts), desc="generate")
        while len(final) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[rid] for rid in ids]

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the other tensor-parallel ranks, release the model and the pool (GPU memory is returned to the
        allocator's cache, then emptied)."""
        if getattr(self, "driver", None) is not None:
            self.driver.stop()
            self.driver = None
        graphs = getattr(getattr(self, "runner", None), "graphs", None)
        if graphs is not None:
            graphs.release()
        for name in ("runner", "scheduler", "pool", "model"):
            if hasattr(self, name):
                delattr(self, name)
        # The model, pool, attention backend and graphs refer to each other: without a collection here their
        # memory stayed allocated until Python's next cyclic GC, and an engine built right after this one in the
        # same process found no room for its pool (an H200 run of 2026-12-02: "only 0 KV slots fit").
        gc.collect()
        if getattr(self, "device", torch.device("cpu")).type == "cuda":
            release_library_workspaces()
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
