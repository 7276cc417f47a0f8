"""``LLM``: the user API of the engine (``generate`` for batches; ``add_request``/``step``/``abort`` for streaming).

    llm = LLM("path/to/model", sparse_method="snapkv", num_top_tokens=2048)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import itertools
import time
import warnings

import torch

from .config import EngineConfig, build_method, default_dtype
from .kv_pool import KVPool
from .model import EngineModel
from .request import Request, RequestOutput
from .runner import ModelRunner
from .scheduler import Scheduler
from .weights import init_random_weights, iter_safetensors, load_weights

from .output import OutputProcessor
from .sampler import Sampler
from .sampling_params import SamplingParams

#: Slots per layer on CPU when ``num_kv_slots`` is not given.
CPU_DEFAULT_SLOTS = 65536


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


class LLM:
    """A serving engine over one device. See :class:`~.config.EngineConfig` for the knobs; ``sparse_knobs`` are
    the HF path's ``cache_config`` names (``num_top_tokens``, ``window_size``, ...)."""

    def __init__(self, model, tokenizer=None, *, dtype=None, device=None, max_model_len=None,
                 gpu_memory_utilization=0.9, max_num_seqs=64, max_num_batched_tokens=8192, chunk_prefill_size=2048,
                 enforce_eager=False, num_kv_slots=None, sparse_method=None, **sparse_knobs):
        self.config = EngineConfig(max_model_len, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens,
                                   min(chunk_prefill_size, max_num_batched_tokens), enforce_eager, num_kv_slots,
                                   sparse_method)
        hf_config, tensors, self.tokenizer, self.eos_token_ids = _load_source(model, tokenizer)
        self.device = torch.device(device) if device is not None else _default_device(model)
        self.dtype = dtype or default_dtype(self.device)
        self.max_model_len = self.config.max_model_len or hf_config.max_position_embeddings
        self.method = build_method(sparse_method, sparse_knobs, hf_config.num_hidden_layers)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)        # parameters are born in dtype (no fp32 copy of a 7B model);
        try:                                       # RoPE's cos/sin tables are computed in fp32 explicitly
            with torch.device(self.device):
                self.model = EngineModel(hf_config, self.max_model_len)
        finally:
            torch.set_default_dtype(previous)
        if tensors is None:
            init_random_weights(self.model)
        else:
            load_weights(self.model, tensors)
        self.model.eval().requires_grad_(False)
        evicts = self.method is not None and self.method.family == "evict"
        slots = self.config.num_kv_slots or self._size_pool(evicts)
        if not evicts and self.max_model_len > slots:
            warnings.warn(f"max_model_len={self.max_model_len} exceeds the pool's {slots} slots; capped to {slots}")
            self.max_model_len = slots
        self.pool = KVPool(self.model.num_layers, self.model.num_kv_heads, self.model.head_dim, slots,
                           self.config.max_num_seqs, self.max_model_len, evicts, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.pool, self.method)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            from .graphs import DecodeGraphs
            self.runner.graphs = DecodeGraphs(self.model, self.pool, self.config.max_num_seqs, self.runner.attention)
        self.scheduler = Scheduler(self.config, self.pool)
        self.sampler = Sampler()
        self.output_processor = OutputProcessor(self.tokenizer or _NoText(), self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._ids = itertools.count()

    # -- sizing ----------------------------------------------------------------------------------------------
    def _size_pool(self, evicts: bool) -> int:
        """Slots per layer: on CPU ``min(max_num_seqs * max_model_len, 65536)``; on CUDA what fits in
        ``gpu_memory_utilization`` of the device after the weights and a profiled prefill step."""
        cfg = self.config
        if self.device.type != "cuda":
            return min(cfg.max_num_seqs * self.max_model_len, CPU_DEFAULT_SLOTS)
        from .graphs import profile_peak_bytes
        peak = profile_peak_bytes(self.model, cfg, self.max_model_len, self.dtype, self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        m = self.model
        groups = m.num_layers if evicts else 1
        per_slot = (2 * m.num_layers * m.num_kv_heads * m.head_dim * torch.tensor([], dtype=self.dtype).element_size()
                    + 4 * groups)                  # K/V of every layer + the free-stack entries
        table_bytes = groups * cfg.max_num_seqs * self.max_model_len * 4 * 2
        free = int(total * cfg.gpu_memory_utilization) - peak - table_bytes
        slots = free // per_slot
        if slots < cfg.max_num_batched_tokens:
            raise RuntimeError(f"only {max(slots, 0)} KV slots fit (weights + activations use {peak / 2**30:.1f} GiB); "
                               "raise gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs / "
                               "max_model_len")
        return int(slots)

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
        if len(ids) + 1 > self.pool.num_slots:
            raise ValueError(f"prompt of {len(ids)} tokens can never fit the KV pool of {self.pool.num_slots} slots "
                             "per layer; raise num_kv_slots or gpu_memory_utilization, or lower max_num_seqs / "
                             "max_model_len")
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
                "kv_usage": pool.used_slots() / (pool.num_slots * pool.num_layers)}

    # -- stepping --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that got a token, finished or were aborted since the last step."""
        outputs = [r.output() for r in self._aborted]
        self._aborted.clear()
        kind, batch = self.scheduler.schedule()
        if kind == "prefill":
            logits = self.runner.prefill(batch)
            done = [req for req, _ in batch if req.num_computed == req.num_tokens]
        elif kind == "decode":
            logits = self.runner.decode(batch)
            done = batch
        else:
            return outputs
        if done:
            params = [r.params for r in done]
            steps = torch.tensor([len(r.output_token_ids) for r in done], device=logits.device)
            tokens = self.sampler(logits, params, steps, self.eos_token_ids).tolist()
            now = time.perf_counter()
            for req, token in zip(done, tokens):
                self._append(req, int(token), now)
                outputs.append(req.output())
        return outputs

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
        """Release the model and the pool (GPU memory is returned to the allocator's cache, then emptied)."""
        for name in ("runner", "scheduler", "pool", "model"):
            if hasattr(self, name):
                delattr(self, name)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
