"""``y = x @ w.T (+ bias)`` for few rows (a decode step's ``M <= 16`` tokens): a weight-streaming Triton GEMM.

Why: at decode a linear layer is a read of its weight matrix; what matters is how close the read gets to the memory
bandwidth. Each program owns ``BLOCK_N`` output columns for all ``M`` rows and streams its ``[BLOCK_N, K]`` slice of
the weight once, in ``BLOCK_K`` tiles that Triton pipelines (``num_stages``), so many bytes are in flight on every SM
without a split-K reduction pass. Whether it beats cuBLAS for a shape is measured by
``benchmarks/bench_decode_ops.py``; the engine uses it only where it does (see :func:`skinny_linear`).

Torch version: :func:`torch.nn.functional.linear` (the reference is the framework's own op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, tl, triton, use_triton
from .sparse_decode import dot_config

MAX_ROWS = 16

if HAS_TRITON:

    @triton.jit
    def _skinny_gemm_kernel(X, W, BIAS, Y, M, N, K, sx_m, sw_n, sy_m,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        nm = n < N
        mm = m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            km = kk < K
            x = tl.load(X + m[:, None] * sx_m + kk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(W + n[:, None] * sw_n + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + m[:, None] * sy_m + n[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])
else:  # pragma: no cover - exercised only without triton
    _skinny_gemm_kernel = None


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto",
                  *, block_n: int = 32, block_k: int = 256, num_stages: int = 4, num_warps: int = 4) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the weight-streaming kernel when ``x`` has at most 16 rows.

    Args:
        x: ``[..., K]`` (at most :data:`MAX_ROWS` rows once flattened, else ``F.linear``); weight: ``[N, K]``;
            bias: optional ``[N]``. Last dims contiguous.
        backend: ``"auto"`` (Triton for fp16/bf16 CUDA tensors, ``F.linear`` otherwise), ``"triton"``, ``"torch"``.
        block_n, block_k, num_stages, num_warps: the tile and pipeline depth (launch tuning).

    Returns:
        ``[..., N]`` in ``x.dtype`` (fp32 accumulation, bias added before the rounding, as cuBLAS's epilogue).
    """
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"skinny_linear: weight {tuple(weight.shape)} must be [N, {K}] for x {tuple(x.shape)}")
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], weight.shape[0]
    auto_ok = backend != "auto" or x.dtype in (torch.float16, torch.bfloat16)
    fast = (auto_ok and 0 < M <= MAX_ROWS and use_triton(backend, _skinny_gemm_kernel, x, weight)
            and weight.stride(1) == 1 and (bias is None or bias.stride(0) == 1))
    if not fast:
        return F.linear(x, weight, bias)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dot_f32, prec = dot_config(_skinny_gemm_kernel, weight.dtype)
    _skinny_gemm_kernel[(triton.cdiv(N, block_n),)](
        x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0), N,
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=dot_f32, PREC=prec,
        num_warps=num_warps, num_stages=num_stages)
    return y.view(*x.shape[:-1], N)
