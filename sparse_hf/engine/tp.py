"""Tensor parallelism over ``torch.distributed``: the process groups, the driver's link to its workers, and how
ranks start (the engine's own spawn, or ``torchrun``).

Layout: attention heads (query and KV, each KV head with its query group) and the MLP's intermediate columns are
split across ``N`` ranks; ``qkv_proj`` and ``gate_up_proj`` are column-parallel, ``o_proj`` and ``down_proj``
row-parallel with an all-reduce (sum) of their outputs; embeddings, norms and the LM head are replicated. Each rank
holds the KV pool of its own KV heads.

Two process groups:

- the *data* group (NCCL on CUDA, gloo on CPU, a timeout of ``collective_timeout_s``) carries the per-layer
  all-reduces of the forward and the all-reduce (max) of OmniKV's per-token scores;
- the *control* group (always gloo, on the CPU) carries the step plans from rank 0 (which runs the scheduler and
  the sampler) to the other ranks: pickled into one broadcast of :data:`INLINE_BYTES` bytes (a second broadcast
  carries the rest of a larger message, e.g. a long prefill's token ids). Nothing goes through shared memory, so
  ranks may sit on different machines (``torchrun``).

A dead rank: the driver's watchdog thread sees a spawned worker exit and aborts the process groups, so a blocked
collective fails at once and every later call raises :class:`TensorParallelError`. Gloo reports a closed peer
connection by itself (``torchrun``); the data group's timeout bounds the rest.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: Timeout of the forward's collectives (all ranks run the same step, so only a stuck rank waits this long).
COLLECTIVE_TIMEOUT_S = 300.0
#: Timeout of a worker's wait for the next step (the driver may sit idle between requests).
IDLE_TIMEOUT_S = 7 * 24 * 3600.0
#: Bytes of a control message's first broadcast: an 8-byte length, then the pickle (a decode plan of 64 rows fits).
INLINE_BYTES = 4096


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group died or failed; the engine cannot continue."""


def check_divisible(hf_config, tp_size: int) -> None:
    """Raise ``ValueError`` unless the query heads, the KV heads and the MLP width divide by ``tp_size``."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size={tp_size!r}: expected an int >= 1")
    counts = {"num_attention_heads": hf_config.num_attention_heads,
              "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
              "intermediate_size": hf_config.intermediate_size}
    bad = {name: n for name, n in counts.items() if n % tp_size}
    if bad:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's "
                         + ", ".join(f"{name}={n}" for name, n in bad.items())
                         + f" (each rank holds an equal share); choose a divisor of "
                         f"gcd({', '.join(str(n) for n in counts.values())})")


@dataclass
class TPGroup:
    """This rank's place in the group and the collectives the model calls."""

    rank: int
    size: int
    data_group: object = None
    control_group: object = None
    owns_world: bool = True                 # the engine created the default group (and destroys it when done)
    #: ``tp_selection == "exact"``: selections spanning heads of several ranks combine the ranks' scores first.
    exact_selection: bool = True

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.data_group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.data_group)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.data_group)
        return x

    def reduce_heads(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """This rank's reduction over its heads (``op`` ``"max"`` or ``"mean"``, ranks holding equal shares) ->
        the reduction over every head of the group, in place (the methods' ``reduce_heads`` hook)."""
        if op == "max":
            return self.all_reduce_max(x)
        if op == "mean":
            return self.all_reduce_sum(x).div_(self.size)
        raise ValueError(f"reduce_heads: op={op!r}, expected 'max' or 'mean'")

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (``n`` divisible by ``size``)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` (or other env:// launcher) group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def rank_device(device: torch.device, rank: int, torchrun: bool) -> torch.device:
    """The device of ``rank``: CPU stays CPU; on CUDA ``cuda:LOCAL_RANK`` under torchrun, else the driver's index
    plus the rank (spawned ranks on one host)."""
    if device.type != "cuda":
        return device
    if torchrun:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", (device.index or 0) + rank)


def init_groups(rank: int, size: int, device: torch.device, init_method: str | None,
                collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TPGroup:
    """Join the default process group (unless already joined) and make the control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_world = not dist.is_initialized()
    if owns_world and backend == "nccl" and rank == 0:
        # NCCL's default on a failed or timed-out collective tears the process down; rank 0 is the user's process
        # (a server, a notebook): abort the communicators and raise instead (2 = CleanUpOnly), unless set.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    if owns_world:
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
    if dist.get_world_size() != size:
        raise ValueError(f"tensor_parallel_size={size} but the process group has {dist.get_world_size()} ranks; "
                         f"launch with torchrun --nproc-per-node {size} (times nodes) or pass the group's size")
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=IDLE_TIMEOUT_S))
    return TPGroup(dist.get_rank(), size, dist.group.WORLD, control, owns_world)


def abort_groups() -> None:
    """Make pending and later collectives of this process fail (a peer died); best effort."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:                                      # noqa: BLE001  (already torn down, or not supported)
        pass


def destroy_groups(tp: TPGroup) -> None:
    """Leave the engine's groups: the default group only if the engine created it (a caller's own group stays)."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group(None if tp.owns_world else tp.control_group)
    except Exception:                                      # noqa: BLE001
        pass


class Driver:
    """Rank 0's side: sends each step's plan (with the rows released since the last message) to the workers,
    gathers replies to calls, watches spawned workers and stops them.

    Messages (:func:`broadcast_message` on the control group): ``("step", released_rows, plan)``,
    ``("call", released_rows, name)`` (every rank answers through ``gather_object``) and ``("stop",)``.
    """

    def __init__(self, tp: TPGroup, processes=()):
        self.tp = tp
        self.processes = list(processes)                     # spawned workers (empty under torchrun)
        self.failure: str | None = None
        self._stopping = False
        if self.processes:
            threading.Thread(target=self._watch, name="sparse-hf-tp-watchdog", daemon=True).start()

    # -- failure --------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        from multiprocessing.connection import wait

        wait([p.sentinel for p in self.processes])
        if self._stopping:
            return
        self.failure = self._dead_rank(wait_s=2.0) or "a tensor-parallel rank exited"
        abort_groups()

    def _dead_rank(self, wait_s: float = 0.0) -> str | None:
        """Which spawned rank exited, as a message (waiting up to ``wait_s`` for its exit to show)."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self.processes, start=1):
                if proc.exitcode is not None:
                    return (f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; the "
                            "engine cannot continue: close it and start a new one")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def check(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def _broadcast(self, message) -> None:
        self.check()
        try:
            broadcast_message(message, self.tp)
        except Exception as exc:                             # noqa: BLE001  (gloo: a peer closed its connection)
            self._failed(exc)

    def _failed(self, exc: Exception):
        """Mark the engine failed, naming the dead rank when a spawned one exited (a peer's closed connection
        often shows up here before the watchdog sees the exit)."""
        if self.failure is None:
            dead = self._dead_rank(wait_s=2.0) if self.processes else None
            self.failure = dead or (f"a tensor-parallel step failed ({type(exc).__name__}: {exc}); the engine "
                                    "cannot continue: close it and start a new one")
        raise TensorParallelError(self.failure) from exc

    def guarded(self, fn, *args):
        """Run rank 0's part of a step. Any error ends the engine (:class:`TensorParallelError`, the original as
        its cause): the other ranks may be inside the step's collectives, out of step with rank 0 for good."""
        self.check()
        try:
            return fn(*args)
        except Exception as exc:                             # noqa: BLE001
            self._failed(exc)

    # -- messages -----------------------------------------------------------------------------------------------
    def send_step(self, released: list[int], plan) -> None:
        self._broadcast(("step", released, plan))

    def call(self, released: list[int], name: str, local_result) -> list:
        """Every rank runs worker call ``name``; returns the results by rank (``local_result`` is rank 0's)."""
        self._broadcast(("call", released, name))
        results = [None] * self.tp.size
        try:
            dist.gather_object(local_result, results, dst=0, group=self.tp.control_group)
        except Exception as exc:                             # noqa: BLE001
            self._failed(exc)
        return results

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to exit, wait for them (killing the ones that do not), leave the groups."""
        if self._stopping:
            return
        self._stopping = True
        if self.failure is None:
            try:
                broadcast_message(("stop",), self.tp)
            except Exception:                                # noqa: BLE001
                pass
        for proc in self.processes:
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=timeout_s)
        if self.failure is None:
            destroy_groups(self.tp)
        else:
            abort_groups()


def start_spawned(spec, size: int, device: torch.device, startup_timeout_s: float = COLLECTIVE_TIMEOUT_S):
    """Spawn ranks ``1..size-1`` (``torch.multiprocessing``, spawn context) and join them as rank 0 over a TCP
    rendezvous on 127.0.0.1. Returns ``(TPGroup, Driver)``; a worker that dies before the rendezvous raises
    :class:`TensorParallelError` at once."""
    import time

    import torch.multiprocessing as mp

    from .worker import spawned_worker_main

    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=spawned_worker_main, args=(rank, size, init_method, spec, os.getpid()),
                             name=f"sparse-hf-tp-rank{rank}", daemon=True) for rank in range(1, size)]
    for proc in processes:
        proc.start()
    result: dict = {}

    def join():
        try:
            result["tp"] = init_groups(0, size, device, init_method)
        except BaseException as exc:                       # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=join, name="sparse-hf-tp-rendezvous", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while thread.is_alive():
        thread.join(timeout=0.2)
        dead = [(rank, p) for rank, p in enumerate(processes, start=1) if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            for proc in processes:
                proc.kill()
            what = (f"rank {dead[0][0]} exited with code {dead[0][1].exitcode} (its traceback is above)" if dead
                    else f"the ranks did not meet within {startup_timeout_s:.0f} s")
            raise TensorParallelError(f"tensor-parallel startup failed: {what}")
    if "error" in result:
        for proc in processes:
            proc.kill()
        raise TensorParallelError(f"tensor-parallel startup failed: {result['error']}") from result["error"]
    tp = result["tp"]
    return tp, Driver(tp, processes)


def broadcast_message(message, tp: TPGroup) -> None:
    """Rank 0's side of :func:`receive`: ``message`` pickled, in one broadcast when it fits, else two."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    head = torch.zeros(INLINE_BYTES, dtype=torch.uint8)
    head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    inline = min(len(data), INLINE_BYTES - 8)
    if inline:
        head[8: 8 + inline] = torch.frombuffer(bytearray(data[:inline]), dtype=torch.uint8)
    dist.broadcast(head, src=0, group=tp.control_group)
    if len(data) > inline:
        dist.broadcast(torch.frombuffer(bytearray(data[inline:]), dtype=torch.uint8), src=0, group=tp.control_group)


def receive(tp: TPGroup):
    """A worker's wait for the driver's next message (see :func:`broadcast_message`)."""
    head = torch.empty(INLINE_BYTES, dtype=torch.uint8)
    dist.broadcast(head, src=0, group=tp.control_group)
    size = int(head[:8].view(torch.int64).item())
    inline = min(size, INLINE_BYTES - 8)
    data = head[8: 8 + inline].numpy().tobytes()
    if size > inline:
        rest = torch.empty(size - inline, dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=tp.control_group)
        data += rest.numpy().tobytes()
    return pickle.loads(data)
