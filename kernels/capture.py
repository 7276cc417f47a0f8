"""One guard around every CUDA-graph capture of sparse-hf (the HF path's :class:`~sparse_hf.hf.cuda_graph.
GraphDecoder` and the engine's :func:`~sparse_hf.engine.graphs.capture_step`).

torch >= 2.9's ``torch.cuda.graph`` no longer runs ``gc.collect()`` before a capture. An automatic garbage
collection that starts *during* a capture may free an older, unreachable ``CUDAGraph`` (a closed cache or engine in
a reference cycle); its ``reset()`` is not permitted while a stream captures, and it invalidates the capture
(seen on an H200, 2026-12-02: "operation not permitted when stream is capturing (function reset)", then
``cudaErrorStreamCaptureInvalidated``, and that decode fell back to eager). The guard collects first and keeps the
collector off until the capture ends.
"""

from __future__ import annotations

import contextlib
import gc


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
