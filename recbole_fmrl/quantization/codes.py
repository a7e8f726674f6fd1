"""QARM's quantitative codes: RQ-Kmeans (residual k-means levels) and VQ (top-k nearest items).

Both are training-free and deterministic given the seed. k-means itself is scikit-learn's (vectorised,
k-means++ init, seeded): this module only chains the levels and reports their quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from recbole_fmrl.errors import ConfigError


@dataclass
class RQCodes:
    """RQ-Kmeans result: ``codes[i, l]`` is item i's cluster at level l; ``centroids[l]`` is ``[C, dim]``."""

    codes: np.ndarray
    centroids: list[np.ndarray]
    # mean squared reconstruction error of x by the sum of its level centroids, after each level
    errors: list[float] = field(default_factory=list)


def _check_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [items, dim] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN/Inf values")
    return x


def rq_kmeans(
    x: np.ndarray, levels: int, codebook_size: int, seed: int = 2020, max_iter: int = 50
) -> RQCodes:
    """Residual k-means: level l clusters what levels 0..l-1 left unexplained (QARM, training-free).

    ``x`` is ``[n, dim]``; returns codes ``[n, levels]`` in ``[0, codebook_size)``.
    """
    from sklearn.cluster import KMeans

    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ConfigError(
            f"qarm_rq_levels={levels!r} must be a whole number >= 1 (levels of residual k-means)."
        )
    x = _check_matrix(x, "rq_kmeans input")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
        raise ConfigError(f"qarm_rq_codebook={codebook_size!r} must be a whole number >= 2.")
    if codebook_size > x.shape[0]:
        raise ConfigError(
            f"qarm_rq_codebook={codebook_size} is larger than the {x.shape[0]} items to cluster: "
            f"use a codebook of at most {x.shape[0]} (fewer clusters than items), or ~ for the automatic size."
        )
    residual = x.astype(np.float64)  # sklearn upcasts float32 distances chunk by chunk: 5x slower
    codes = np.empty((x.shape[0], levels), dtype=np.int64)
    centroids, errors = [], []
    for level in range(levels):
        km = KMeans(n_clusters=codebook_size, n_init=1, max_iter=max_iter, random_state=seed + level)
        codes[:, level] = km.fit_predict(residual)
        centre = km.cluster_centers_
        residual -= centre[codes[:, level]]
        centroids.append(centre.astype(np.float32))
        errors.append(float((residual**2).sum(1).mean()))
    return RQCodes(codes, centroids, errors)


def vq_codes(
    x: np.ndarray | torch.Tensor,
    k: int,
    pool: np.ndarray | torch.Tensor | None = None,
    exclude_self: bool = True,
    chunk_size: int = 4096,
) -> np.ndarray:
    """Ids (rows of ``pool``) of each row's ``k`` most cosine-similar pool items, most similar first.

    ``pool`` defaults to ``x`` itself; then ``exclude_self`` leaves each item out of its own code, so an
    item is described by its neighbours (what lets a cold item share what its neighbours learned). Rows are
    scored ``chunk_size`` at a time: memory is ``chunk_size x len(pool)``, whatever the catalogue size.
    """
    same = pool is None
    x = torch.as_tensor(_check_matrix(np.asarray(x), "vq_codes input"))
    pool_t = x if same else torch.as_tensor(_check_matrix(np.asarray(pool), "vq_codes pool"))
    excluded = 1 if same and exclude_self else 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"qarm_vq_k={k!r} must be a whole number >= 1 (neighbours per item).")
    if k > pool_t.shape[0] - excluded:
        raise ConfigError(
            f"qarm_vq_k={k} needs at least {k + excluded} items in the pool, which has {pool_t.shape[0]}: "
            f"use qarm_vq_k <= {pool_t.shape[0] - excluded}."
        )
    unit = torch.nn.functional.normalize(x, dim=1)
    pool_unit = unit if same else torch.nn.functional.normalize(pool_t, dim=1)
    out = torch.empty((x.shape[0], k), dtype=torch.int64)
    for start in range(0, x.shape[0], chunk_size):
        sims = unit[start : start + chunk_size] @ pool_unit.T
        if excluded:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -torch.inf
        out[start : start + chunk_size] = sims.topk(k, dim=1).indices
    return out.numpy()


def code_stats(codes: np.ndarray, codebook_size: int | None = None) -> dict:
    """Codebook usage per level (share of codewords used) and collision rate (items sharing a full code)."""
    codes = np.asarray(codes)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    stats = {
        "items": int(codes.shape[0]),
        "distinct_codes": int(len(counts)),
        "collision_rate": float((counts[inverse.reshape(-1)] > 1).mean()),
    }
    if codebook_size is not None:
        stats["codebook_usage"] = [
            len(np.unique(codes[:, level])) / codebook_size for level in range(codes.shape[1])
        ]
    return stats
