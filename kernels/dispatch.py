"""Backend selection and launch heuristics shared by the decode kernels.

Why this module exists: the Triton kernels must be optional. ``import sparse_hf.kernels`` has to work on a
machine without Triton (the torch reference in :mod:`sparse_hf.kernels.reference` then serves every call),
and on a CPU-only machine the kernels only run under the Triton interpreter, which Triton decides once, when
a ``@triton.jit`` function is *decorated* (``TRITON_INTERPRET=1`` must be set before the kernel modules are
imported). :func:`use_triton` encodes those rules in one place.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton is an optional dependency (extra "kernels").
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails at import time
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was built by the Triton interpreter (``TRITON_INTERPRET=1`` at decoration time)."""
    return kernel is not None and type(kernel).__name__ == "InterpretedFunction"


def use_triton(backend: str, kernel, *tensors: torch.Tensor) -> bool:
    """Decide whether a call runs the Triton ``kernel`` (True) or the torch reference (False).

    This is the one place where that choice is made. ``"torch"`` always picks the reference; ``"triton"`` forces
    the kernel and raises when it cannot run (CUDA tensors, or CPU tensors with a kernel built under the
    interpreter); ``"auto"`` picks Triton when it is importable, the dtype is fp16/bf16/fp32 and the tensors are
    on CUDA. Under ``"auto"`` CPU tensors always take the torch reference, even when the interpreter is on
    (``TRITON_INTERPRET=1`` in the tests): the interpreter is a test tool, far slower than torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    dev = tensors[0].device
    ok_dtype = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' but triton is not installed (pip install triton)")
        if kernel is None or not (dev.type == "cuda" or is_interpreted(kernel)):
            raise RuntimeError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               f"sparse_hf.kernels is imported (tensors are on {dev})")
        if not ok_dtype:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32 tensors only")
        return True
    return HAS_TRITON and kernel is not None and dev.type == "cuda" and ok_dtype


def kernels_run_fused(t: torch.Tensor) -> bool:
    """True when ``backend="auto"`` gives Triton for tensors like ``t`` (CUDA, Triton importable).

    Callers that pick between a kernel entry point and another path (SDPA) ask this, rather than testing
    ``t.is_cuda and HAS_TRITON`` themselves."""
    return HAS_TRITON and t.device.type == "cuda" and t.dtype in TRITON_DTYPES


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off-GPU, so the interpreter gets no needless splits)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


#: Programs per SM the decode kernels aim for when they choose their own split. An H200 sweep (2026-12-02, single
#: launches, so absolute times include launch overhead; the differences between splits are the kernel's) found split
#: 1024 ~15 us faster than 2048 per call at one 128K row, and 256 a few us faster than 512 at 8 rows of 4K: both what
#: four programs per SM choose. Not yet re-measured inside the engine's CUDA graph.
DECODE_PROGRAMS_PER_SM = 4


def plan_splits(n: int, programs: int, device: torch.device, split_size: int | None = None,
                max_block: int = 64, programs_per_sm: int = 2) -> tuple[int, int, int]:
    """Split a length-``n`` reduction (index list or key range) into chunks for split-K.

    ``programs`` is the number of independent (batch, kv-head) rows already launched. Without an explicit
    ``split_size``, the list is cut so that about ``programs_per_sm`` programs run per SM (a single long sequence
    still fills the GPU), but never below one block per chunk. Returns ``(split_size, num_splits, block_n)`` where
    ``block_n`` (a power of two in [16, max_block]) is the per-iteration tile inside a chunk.
    """
    n = max(int(n), 1)
    if split_size is None:
        block_n = max_block
        want = max(1, -(-programs_per_sm * num_sms(device) // max(programs, 1)))
        blocks = -(-n // block_n)
        per = -(-blocks // min(want, blocks))
        split_size = per * block_n
    else:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        block_n = min(max_block, max(16, next_pow2(split_size)))
    num_splits = -(-n // split_size)
    return int(split_size), int(num_splits), int(block_n)
