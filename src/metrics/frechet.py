"""Fréchet distance between Gaussians fitted to feature sets (the formula behind FID-style scores)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_float64(x: ArrayLike | float, name: str) -> Tensor:
    """Any tensor/array -> a CPU float64 tensor (no grad), rejecting NaN/inf early with a clear message."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return t


def gaussian_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of ``features`` (N, d), both float64 on the CPU.

    Matches ``np.mean(f, 0)`` and ``np.cov(f, rowvar=False)`` as in the reference FID code.
    """
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, d), got {tuple(f.shape)}")
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors to estimate a covariance, got {n}")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (n - 1)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, negative rounding-error eigenvalues clamped to 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` for means (d,) and covariances (d, d),
    given as torch tensors or numpy arrays.
    """
    m1, m2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(
            f"mu1 and mu2 must be vectors of the same length, got {tuple(m1.shape)} and {tuple(m2.shape)}"
        )
    d = m1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {tuple(s.shape)}")
    # Covariances are symmetric in exact arithmetic; averaging with the transpose removes rounding asymmetry.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2

    # Tr (S1 S2)^{1/2} = sum of sqrt(eigenvalues of S1 S2). S1 S2 is similar to the symmetric PSD matrix
    # A = S1^{1/2} S2 S1^{1/2}, so we take eigvalsh(A) (real by construction) and clamp the tiny negative
    # values rounding produces before the sqrt. Unlike scipy.linalg.sqrtm on the non-symmetric S1 S2 this
    # never returns complex parts, needs no eps*I retry for singular covariances (common when N < d or
    # with dead ReLU features), and only uses symmetric eigensolvers, which are backward stable.
    # numpy's LAPACK rather than torch's: torch's OpenMP threads made a 128x128 eigh take ~1 s instead of
    # ~1 ms on a busy 2-core machine (measured), and this is called once per evaluation anyway.
    s1_np, s2_np = s1.numpy(), s2.numpy()
    root1 = _psd_sqrt(s1_np)
    inner = root1 @ s2_np @ root1
    inner = (inner + inner.T) / 2
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()

    diff = (m1 - m2).numpy()
    value = diff @ diff + np.trace(s1_np) + np.trace(s2_np) - 2 * tr_covmean
    # The true distance is >= 0; cancellation can leave a tiny negative number for identical inputs.
    return max(float(value), 0.0)
