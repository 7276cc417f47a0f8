"""Shared test setup.

Triton kernels run under the interpreter on machines without a GPU, so the variable must be set before
any module imports triton."""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        # A module that sets TRITON_INTERPRET on import (a benchmark script a test imports did) turns every Triton
        # kernel imported after it into the interpreter's, on CUDA tensors: wrong paths and failures far from the
        # cause. Stop the run and name the cause instead.
        if os.environ.get("TRITON_INTERPRET") != _INTERPRET_AT_START:
            raise pytest.UsageError(
                f"TRITON_INTERPRET changed from {_INTERPRET_AT_START!r} to {os.environ.get('TRITON_INTERPRET')!r} "
                "while the tests were collected: a module imported by a test sets it on import")
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny-model tests run ~100x faster on one thread on a busy 2-core machine; real-model (slow) tests keep
    every core."""
    if "slow" in request.keywords:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
