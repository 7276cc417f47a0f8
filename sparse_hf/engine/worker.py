"""One rank's engine parts (model shard, KV pool, runner), built the same way on every rank, and the loop of a
tensor-parallel worker (rank > 0): receive a plan from rank 0, run it, repeat until told to stop.

:class:`EngineSpec` is everything a rank needs to build its shard; it pickles, so the engine's own spawn passes it
to the worker processes (under ``torchrun`` every rank builds it from the same script's arguments).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from .config import EngineConfig, build_method
from .deltakv_store import runs_layerwise
from .kv_pool import KVPool
from .model import EngineModel, skipping_init
from .runner import ModelRunner
from .scored_pool import ScoredKVPool, ScoredModelRunner
from .weights import init_random_weights, iter_safetensors, load_weights

#: Slots per layer on CPU when ``num_kv_slots`` is not given.
CPU_DEFAULT_SLOTS = 65536


@dataclass
class EngineSpec:
    """What builds one rank's engine parts.

    Attributes:
        hf_config: the transformers config; weights: a model directory (safetensors), a ``{name: tensor}`` dict
            of HF-named full tensors, or ``None`` (random weights, for benchmarks).
        config: the engine knobs; sparse_knobs: the method's knobs (``config.sparse_method`` names it).
        device: the driver's device (rank ``r`` of a spawned group uses the CUDA index plus ``r``).
    """

    hf_config: object
    weights: object
    config: EngineConfig
    sparse_knobs: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_model_len: int = 0


@dataclass
class Shard:
    """One rank's engine parts."""

    model: EngineModel
    pool: KVPool
    runner: ModelRunner
    method: object
    max_model_len: int


def _tensors(weights):
    if weights is None or isinstance(weights, dict):
        return None if weights is None else weights.items()
    return iter_safetensors(weights)


def build_shard(spec: EngineSpec, device: torch.device, tp=None) -> Shard:
    """The model (this rank's share when ``tp`` is a group of more than one), its pool and runner."""
    cfg = spec.config
    if tp is not None:
        tp.exact_selection = cfg.tp_selection == "exact"
    method = build_method(cfg.sparse_method, spec.sparse_knobs, spec.hf_config.num_hidden_layers)
    tensors = _tensors(spec.weights)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)        # parameters are born in dtype (no fp32 copy of a 7B model);
    try:                                       # RoPE's cos/sin tables are computed in fp32 explicitly
        # no random init for weights that load_weights overwrites (it raises unless every parameter is filled)
        with torch.device(device), (skipping_init() if tensors is not None else contextlib.nullcontext()):
            model = EngineModel(spec.hf_config, spec.max_model_len, tp)
    finally:
        torch.set_default_dtype(previous)
    if tensors is None:
        init_random_weights(model)
    else:
        load_weights(model, tensors)
    model.eval().requires_grad_(False)
    evicts = method is not None and method.family == "evict"
    scored = getattr(method, "accumulates_attention", False)          # H2O: scores beside the pool
    slots = cfg.num_kv_slots or size_pool(model, cfg, spec.max_model_len, evicts, spec.dtype, device, scored)
    if tp is not None and tp.size > 1 and cfg.num_kv_slots is None:     # every rank must hold the same slot count
        count = torch.tensor([slots], dtype=torch.long, device=device)
        slots = int(tp.all_reduce_min(count).item())
    max_model_len = spec.max_model_len
    deltakv = method is not None and method.name == "deltakv"
    layerwise = deltakv and runs_layerwise(cfg.deltakv_prefill, max_model_len)   # a prompt may outgrow vanilla's pool
    if not evicts and max_model_len > slots and not layerwise:
        if tp is None or tp.rank == 0:
            warnings.warn(f"max_model_len={max_model_len} exceeds the pool's {slots} slots; capped to {slots}")
        max_model_len = slots
    compute_logits = tp is None or tp.rank == 0
    if deltakv:                                                # a compressed store beside the raw pool
        from .deltakv_attention import DeltaKVRunner
        from .deltakv_store import DeltaKVPool, chunked_room, keeps_pre_norm_keys, layerwise_bytes_per_token, \
            prepare_deltakv, split_slots

        method, projections = prepare_deltakv(method, spec.sparse_knobs, spec.hf_config)
        pre_norm = keeps_pre_norm_keys(spec.hf_config)           # Qwen3: pre-norm keys beside the compressed slots
        # The memory of `slots` full slots, split between the filter and the compressed layers' groups.
        budget = slots * (2 * model.num_layers * model.num_kv_heads * model.head_dim
                          * torch.tensor([], dtype=spec.dtype).element_size() + 4)
        transient = layerwise_bytes_per_token(model.num_kv_heads, model.head_dim, spec.dtype, pre_norm,
                                              spec.hf_config.hidden_size, spec.dtype, cfg.layerwise_hidden_on_host)
        group_slots = split_slots(budget, method, projections, model.num_kv_heads, model.head_dim, spec.dtype,
                                  max_model_len, cfg.max_num_seqs, pre_norm, chunked_room(cfg.deltakv_prefill),
                                  transient)
        holds = group_slots[0] if layerwise else group_slots[1]       # a layer-wise prompt keeps no raw prompt there
        if max_model_len > holds and (tp is None or tp.rank == 0):
            warnings.warn(f"max_model_len={max_model_len} exceeds the {holds} raw slots of deltakv's "
                          f"{'filter' if layerwise else 'compressed'} layers; capped to {holds}")
        max_model_len = min(max_model_len, holds)
        pool = DeltaKVPool(model.num_layers, model.num_kv_heads, model.head_dim, group_slots, cfg.max_num_seqs,
                           max_model_len, spec.dtype, device, method, pre_norm)
        runner = DeltaKVRunner(model, pool, method, projections.to(device), compute_logits=compute_logits)
        if device.type == "cuda" and not cfg.enforce_eager:
            from .deltakv_graphs import DeltaKVGraphs
            runner.graphs = DeltaKVGraphs(model, pool, runner.attention)
        return Shard(model, pool, runner, method, max_model_len)
    pool = (ScoredKVPool if scored else KVPool)(model.num_layers, model.num_kv_heads, model.head_dim, slots,
                                                cfg.max_num_seqs, max_model_len, evicts, spec.dtype, device)
    runner = (ScoredModelRunner if scored else ModelRunner)(model, pool, method,
                                                            compute_logits=compute_logits)
    if device.type == "cuda" and not cfg.enforce_eager:
        from .graphs import DecodeGraphs
        runner.graphs = DecodeGraphs(model, pool, cfg.max_num_seqs, runner.attention)
    return Shard(model, pool, runner, method, max_model_len)


def size_pool(model, cfg: EngineConfig, max_model_len: int, evicts: bool, dtype: torch.dtype,
              device: torch.device, scored: bool = False) -> int:
    """Slots per layer: on CPU ``min(max_num_seqs * max_model_len, 65536)``; on CUDA what fits in
    ``gpu_memory_utilization`` of the device after the weights and a profiled prefill step."""
    if device.type != "cuda":
        return min(cfg.max_num_seqs * max_model_len, CPU_DEFAULT_SLOTS)
    from .graphs import profile_peak_bytes
    peak = profile_peak_bytes(model, cfg, max_model_len, dtype, device)
    total = torch.cuda.get_device_properties(device).total_memory
    groups = model.num_layers if evicts else 1
    per_slot = (2 * model.num_layers * model.num_kv_heads * model.head_dim
                * torch.tensor([], dtype=dtype).element_size() + 4 * groups    # K/V of every layer + free-stack entries
                + (8 * model.num_layers * model.num_kv_heads if scored else 0))  # + fp32 scores, int32 positions
    table_bytes = groups * cfg.max_num_seqs * max_model_len * 4 * 2
    free = int(total * cfg.gpu_memory_utilization) - peak - table_bytes
    slots = free // per_slot
    if slots < cfg.max_num_batched_tokens:
        raise RuntimeError(f"only {max(slots, 0)} KV slots fit (weights + activations use {peak / 2**30:.1f} GiB); "
                           "raise gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs / "
                           "max_model_len")
    return int(slots)


# -- the worker side of tensor parallelism ---------------------------------------------------------------------------
def pool_report(runner) -> str | None:
    """``None`` when this rank's pool is whole (every slot free once, no row holding slots), else what is wrong."""
    try:
        runner.pool.check_whole()
    except AssertionError as exc:
        return str(exc) or "pool not whole"
    return None


#: What the driver may ask every rank (``Driver.call``): name -> function of the rank's runner.
WORKER_CALLS = {"pool_report": pool_report}


def serve(runner, tp) -> None:
    """Run the driver's plans until it says stop (see :class:`~.tp.Driver` for the messages)."""
    import torch.distributed as dist

    from .tp import receive

    while True:
        message = receive(tp)
        kind = message[0]
        if kind == "stop":
            return
        for row in message[1]:
            runner.pool.release_row(row)
        if kind == "step":
            runner.run(message[2])
        elif kind == "call":
            dist.gather_object(WORKER_CALLS[message[2]](runner), None, dst=0, group=tp.control_group)
        else:
            raise RuntimeError(f"unknown message from the driver: {kind!r}")


def _exit_with_parent(parent: int) -> None:
    """A spawned worker ends when the driver's process is gone (killed without closing the engine)."""
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def run_worker(rank: int, size: int, init_method: str | None, spec: EngineSpec, torchrun: bool,
               parent: int | None = None) -> None:
    """A worker rank's whole life: join the groups (before loading, so the driver's rendezvous is quick), build
    the shard, serve, leave. An error is printed with this rank's traceback and ends the process with code 1.
    Ctrl-C reaches every process of the group (a terminal, torchrun); only the driver acts on it: it stops the
    workers when it closes the engine."""
    import signal

    from .tp import destroy_groups, init_groups, rank_device

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        device = rank_device(torch.device(spec.device), rank, torchrun)
        tp = init_groups(rank, size, device, init_method)
        shard = build_shard(spec, device, tp)
        serve(shard.runner, tp)
    except BaseException:                                   # noqa: BLE001
        print(f"sparse-hf tensor-parallel rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    destroy_groups(tp)


def spawned_worker_main(rank: int, size: int, init_method: str, spec: EngineSpec, parent: int) -> None:
    """Entry point of a worker process started by the engine (``torch.multiprocessing`` spawn)."""
    run_worker(rank, size, init_method, spec, torchrun=False, parent=parent)
