"""One guard around every CUDA-graph capture of sparse-hf (the HF path's :class:`~sparse_hf.hf.cuda_graph.
GraphDecoder` and the engine's :func:`~sparse_hf.engine.graphs.capture_step`).

torch >= 2.9's ``torch.cuda.graph`` no longer runs ``gc.collect()`` before a capture. An automatic garbage
collection that starts *during* a capture may free an older, unreachable ``CUDAGraph`` (a closed cache or engine in
a reference cycle); its ``reset()`` is not permitted while a stream captures, and it invalidates the capture
(seen on an H200, 2026-12-02: "operation not permitted when stream is capturing (function reset)", then
``cudaErrorStreamCaptureInvalidated``, and that decode fell back to eager). The guard collects first and keeps the
collector off until the capture ends.

Every capture also runs on one side stream per device (:func:`capture_stream`): cuBLAS keeps a workspace per
(handle, stream) that lives as long as the process, so a new stream per capture left ~64 MiB behind per captured
batch bucket, and an engine closed and rebuilt in one process kept them all (H200, 2026-12-02: 67,144,704 bytes
still allocated after ``LLM.close()``). :func:`release_library_workspaces` frees them when an engine closes.
"""

from __future__ import annotations

import contextlib
import gc

import torch

_CAPTURE_STREAMS: dict = {}


@contextlib.contextmanager
def no_collection_during_capture():
    """Collect garbage now, then disable the cyclic collector for the block (re-enabled after, if it was on)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture_stream(device=None) -> "torch.cuda.Stream":
    """The side stream every warm-up and capture of ``device`` (default: the current CUDA device) runs on."""
    index = torch.device("cuda" if device is None else device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


def release_library_workspaces() -> None:
    """Free cuBLAS's per-stream workspaces (they come back on the next GEMM): called when an engine closes."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_initialized():
        clear()
