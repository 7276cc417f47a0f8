"""PCA initialization of a linear DeltaKV compressor (``sparse-hf train-compressor --init pca``).

For fixed references, the MSE-optimal rank-``r`` linear map ``d -> V (V^T d + c)`` of the residuals
``d = x - ref`` takes ``V`` = the top-``r`` principal directions of ``d``. With ``latent = down(x) - down(ref)``
and ``recon = up(latent) + ref``, that is::

    down.weight = V^T  [r, D]        down.bias = anything (it cancels in down(x) - down(ref)); set to 0
    up.weight   = V    [D, r]        up.bias   = mean(d) - V V^T mean(d)

so training starts from the best linear compressor instead of random weights (on a 135M model, a random init
needs hundreds of steps to reach the reconstruction error PCA starts at). The residuals are collected with the
same clustering as training (sinks, center step, ``neighbor_count`` nearest visible centers) in one no-grad pass
per batch of blocks; the covariance is accumulated in float64.

``balance="kv"`` (``--pca_balance kv``) minimises a weighted error instead, ``sum_i w_i (d_i - recon_i)^2`` with
``w`` the inverse of the mean residual variance of the coordinate's half of ``x = concat(K, V)``, so that the K half
and the V half weigh the same in total. On SmolLM2 the V half has less variance than the K half, and the plain PCA
spends the latent on K (rebuilt V 51% off against K 16%: docs/deltakv_quality.md). With ``S = diag(sqrt(w))`` and
``U`` the top-``r`` eigenvectors of ``S C S``: ``down.weight = U^T S``, ``up.weight = S^-1 U``,
``up.bias = mean - S^-1 U U^T S mean`` (``S = I`` is the plain PCA above).
"""

from __future__ import annotations

import torch

from sparse_hf.deltakv.clustering import tail_references

INITS = ("random", "pca")
BALANCES = ("none", "kv")


@torch.no_grad()
def residual_moments(training_model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per compressed layer, ``(sum d d^T [D, D], sum d [D], count)`` in float64 over ``blocks [num, N]``.

    ``training_model`` is a :class:`~sparse_hf.trainer.DeltaKVTrainingModel`; its clustering knobs are used.
    """
    patch, knobs = training_model.patch, training_model.knobs
    device = training_model.compressor.device
    moments: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    if blocks.shape[1] <= knobs["num_sink"]:
        raise ValueError(f"blocks of {blocks.shape[1]} tokens have no token after the {knobs['num_sink']} sinks "
                         "to compress")
    batches = blocks.split(batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="PCA init: collecting residuals")
    previous_mode = patch.mode
    patch.mode = "record"
    try:
        for batch in batches:
            batch = batch.to(device)
            patch.targets.clear()
            training_model.base(input_ids=batch, use_cache=False, logits_to_keep=1)
            for layer, x in patch.targets.items():
                tail, ref = tail_references(x, knobs["num_sink"], knobs["cluster_ratio"], knobs["neighbor_count"],
                                            knobs["metric"])
                d = (x[:, tail] - ref).reshape(-1, x.shape[-1]).double()
                cov, total, count = moments.get(layer, (0.0, 0.0, 0))
                moments[layer] = (cov + d.T @ d, total + d.sum(0), count + d.shape[0])
    finally:
        patch.targets.clear()
        patch.mode = previous_mode
    return moments


def check_balance(balance: str) -> None:
    """``ValueError`` naming the flag unless ``balance`` is one of :data:`BALANCES`."""
    if balance not in BALANCES:
        raise ValueError(f"--pca_balance {balance!r}: expected one of {', '.join(BALANCES)}")


def half_weights(covariance: torch.Tensor, balance: str) -> torch.Tensor:
    """``[D]`` per-coordinate weights of the PCA's error: ones for ``"none"``; for ``"kv"`` the inverse of the mean
    variance of the coordinate's half of ``concat(K, V)`` (the first ``D / 2`` coordinates are K), so both halves
    carry the same total weight of variance."""
    check_balance(balance)
    D = covariance.shape[0]
    if balance == "none":
        return torch.ones(D, dtype=covariance.dtype, device=covariance.device)
    var = covariance.diagonal().clamp(min=torch.finfo(covariance.dtype).tiny)
    half = D // 2
    return torch.cat([var[:half].mean().reciprocal().expand(half), var[half:].mean().reciprocal().expand(D - half)])


@torch.no_grad()
def pca_initialize(training_model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False,
                   balance: str = "none") -> None:
    """Set every layer's linear ``down``/``up`` to the PCA solution over ``blocks [num, N]`` (in place); with
    ``balance="kv"`` the solution of the K/V-balanced error (module docstring).

    Raises ``ValueError`` for MLP projections (no closed form), a latent wider than ``D`` or an unknown balance.
    """
    compressor = training_model.compressor
    cfg = compressor.config
    if cfg.down_type != "linear" or cfg.up_type != "linear":
        raise ValueError(f"--init pca needs linear projections (got down_type={cfg.down_type!r}, "
                         f"up_type={cfg.up_type!r}); use --init random for MLP compressors")
    check_balance(balance)
    r, d_model = cfg.kv_compressed_size, cfg.kv_dim
    if r > d_model:
        raise ValueError(f"--init pca: kv_compressed_size {r} exceeds the K+V width {d_model}")
    for layer, (cov, total, count) in residual_moments(training_model, blocks, batch_size, progress).items():
        mean = total / count
        covariance = cov / count - torch.outer(mean, mean)
        scale = half_weights(covariance, balance).sqrt()                        # S = diag(scale)
        _, vectors = torch.linalg.eigh(scale[:, None] * covariance * scale[None, :])  # ascending eigenvalues
        basis = vectors[:, -r:].flip(-1)  # [D, r], largest (weighted) variance first
        down = basis.T * scale[None, :]                                          # U^T S   [r, D]
        up = basis / scale[:, None]                                              # S^-1 U  [D, r]
        projections = compressor.layers[str(layer)]
        projections.down.weight.copy_(down.to(projections.down.weight.dtype))
        projections.up.weight.copy_(up.to(projections.up.weight.dtype))
        if projections.down.bias is not None:
            projections.down.bias.zero_()
        if projections.up.bias is not None:
            projections.up.bias.copy_((mean - up @ (down @ mean)).to(projections.up.bias.dtype))
