"""Lower-right causal chunk attention from SDPA kernels that only know square causal or no mask ("split" route).

Why: on Hopper, torch's SDPA prefers cuDNN's fused attention (faster than FlashAttention-2) for a full causal
prompt, which is what HF runs; but a chunk that attends to earlier tokens needs lower-right causal alignment, which
SDPA serves with FlashAttention-2 or the memory-efficient kernel only. Split the chunk's attention in two calls
that cuDNN runs: the chunk's queries over every earlier key (no mask) and over its own keys (square causal), each
returning its log-sum-exp, then merge the two partial softmaxes exactly. CUDA only (the private SDPA ops that return
the log-sum-exp have no CPU kernel); :func:`sparse_hf.engine.attention.chunk_attention` stays the engine's route
elsewhere.
"""

from __future__ import annotations

import torch

#: SDPA kernels tried in order (the first that accepts the call wins; remembered per process). Only cuDNN: on the
#: H200 (2026-12-02, 128K prompt, 7B heads) cuDNN ran this route at 584 TFLOP/s, FlashAttention-2 at 333 and the
#: paged Triton kernel at 394, so without cuDNN the engine takes the paged kernel instead (:class:`SplitUnavailable`).
KERNELS = ("cudnn",)
#: Repeat the KV heads for a kernel that refuses fewer of them (a 7x copy of the context: off in the engine).
ALLOW_REPEAT = False
_working: dict[bool, tuple[str, bool]] = {}       # causal -> (kernel, repeats KV heads)


class SplitUnavailable(RuntimeError):
    """No SDPA kernel of :data:`KERNELS` runs the call here (no cuDNN, or it refuses GQA)."""


def _accepts(kernel: str, q, k, v, causal: bool) -> bool:
    """torch's own eligibility check of ``kernel`` for this call (dtype, head dim, GQA, cuDNN version guards), the
    checks ``F.scaled_dot_product_attention`` runs before it picks a kernel; the private ops below skip them."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_flash_attention

        params = SDPAParams(q, k, v, None, 0.0, causal, k.shape[1] != q.shape[1])
    except (ImportError, TypeError, RuntimeError):          # an older torch: let the kernel itself refuse
        return True
    return bool((can_use_cudnn_attention if kernel == "cudnn" else can_use_flash_attention)(params, False))


def _call(kernel: str, q, k, v, causal: bool, scale: float):
    if not _accepts(kernel, q, k, v, causal):
        raise RuntimeError(f"torch's checks refuse {kernel} attention for q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kernel == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1].reshape(q.shape[:3]).float()


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused SDPA call that also returns the log-sum-exp.

    Args:
        q: ``[1, H, n, D]``; k, v: ``[1, Hkv, L, D]`` (GQA; with :data:`ALLOW_REPEAT` the KV heads are repeated
            for a kernel that refuses fewer of them); ``causal``: square (upper-left) causal mask, ``L == n``.

    Returns:
        ``(out [1, H, n, D] in q.dtype, lse [1, H, n] float32, natural log)``.

    Raises:
        SplitUnavailable: no kernel of :data:`KERNELS` accepts the call.
    """
    G = q.shape[1] // k.shape[1]
    repeats = (False, True) if ALLOW_REPEAT else (False,)
    choices = [_working[causal]] if causal in _working else [(kern, rep) for kern in KERNELS for rep in repeats]
    error = None
    for kernel, repeat in choices:
        kk, vv = (k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)) if repeat and G > 1 else (k, v)
        try:
            out = _call(kernel, q, kk, vv, causal, scale)
        except (RuntimeError, NotImplementedError) as e:
            error = e
            continue
        _working[causal] = (kernel, repeat)
        return out
    raise SplitUnavailable(f"no SDPA kernel of {KERNELS} returning the log-sum-exp runs here ({error}); use the paged "
                           "prefill kernel")


def split_chunk_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_self: torch.Tensor,
                          v_self: torch.Tensor, scale: float, return_lse: bool = False):
    """Causal attention of a chunk's ``n`` queries whose keys are ``L`` earlier ones plus its own ``n``.

    Args:
        q: ``[n, H, D]``; k_prefix, v_prefix: ``[L, Hkv, D]`` (``L`` may be 0); k_self, v_self: ``[n, Hkv, D]``.

    Returns:
        ``[n, H, D]``: query ``i`` sees every earlier key and its own keys ``0..i`` (lower-right causal over
        ``L + n`` keys); with ``return_lse``, ``(out, lse)`` where ``lse`` ``[n, H]`` float32 is each query's
        natural-log log-sum-exp over those keys (the two halves' merged: H2O's attention mass reuses it).
    """
    def heads(t):
        return t.transpose(0, 1).unsqueeze(0)                                      # [1, heads, len, D]

    qh = heads(q)
    out, lse = sdpa_with_lse(qh, heads(k_self), heads(v_self), True, scale)
    if k_prefix.shape[0]:
        out_p, lse_p = sdpa_with_lse(qh, heads(k_prefix), heads(v_prefix), False, scale)
        m = torch.maximum(lse, lse_p)
        w, w_p = (lse - m).exp().unsqueeze(-1), (lse_p - m).exp().unsqueeze(-1)    # [1, H, n, 1]
        out = ((out.float() * w + out_p.float() * w_p) / (w + w_p)).to(q.dtype)
        if return_lse:
            lse = m + (w + w_p).squeeze(-1).log()
    out = out[0].transpose(0, 1)
    return (out, lse[0].transpose(0, 1)) if return_lse else out
