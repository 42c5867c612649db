"""Sliced Wasserstein distance between two point clouds (used for the toy 2-D data)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def random_unit_directions(
    num_projections: int, dim: int, generator: torch.Generator | None = None
) -> Tensor:
    """(num_projections, dim) float64 rows drawn uniformly on the unit sphere S^{dim-1}.

    Normalised Gaussian vectors are uniform on the sphere by rotational invariance.
    ``sliced_wasserstein_distance`` draws its directions with exactly this call, so a generator in the
    same state gives the same directions here.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    while True:
        u = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64, device=device)
        norms = u.norm(dim=1, keepdim=True)
        # A zero vector has probability 0 but would give NaNs; redraw rather than bias the directions.
        if bool((norms > 0).all()):
            return u / norms


def _wasserstein_pp_1d(xs: Tensor, ys: Tensor, p: float) -> Tensor:
    """W_p^p between the empirical measures of each column of sorted xs (N, L) and sorted ys (M, L) -> (L,).

    Uses W_p^p = int_0^1 |F^{-1}(t) - G^{-1}(t)|^p dt with the step quantile functions of the two
    samples. Both are constant between consecutive levels of {i/N} U {j/M}, so the integral is an exact
    finite sum; for N == M it reduces to the usual mean of |xs_i - ys_i|^p over sorted pairs.
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).abs().pow(p).mean(dim=0)
    levels = torch.cat(
        [torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m]
    )
    levels = torch.unique(levels)  # sorted; ends at 1.0
    lower = torch.cat([levels.new_zeros(1), levels[:-1]])
    widths = levels - lower
    # Index each quantile function at the interval midpoint: strictly inside, so floor() is never on a
    # breakpoint and float rounding of i/N cannot pick the neighbouring order statistic.
    mid = (lower + levels) / 2
    ix = (mid * n).floor().long().clamp(max=n - 1).to(xs.device)
    iy = (mid * m).floor().long().clamp(max=m - 1).to(ys.device)
    widths = widths.to(xs.device)
    return (widths[:, None] * (xs[ix] - ys[iy]).abs().pow(p)).sum(dim=0)


def sliced_wasserstein_distance(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
    p: float = 2,
) -> float:
    """Sliced p-Wasserstein distance between point clouds x (N, d) and y (M, d), in float64.

    ``(mean_u W_p^p(u.x, u.y))^{1/p}`` over ``num_projections`` random unit directions u (drawn with
    ``random_unit_directions`` from ``generator``). Sizes may differ: the 1-D distances then compare the
    two samples' quantile functions exactly (see ``_wasserstein_pp_1d``). Pass a seeded generator for a
    reproducible value; the Monte-Carlo error over directions shrinks like 1/sqrt(num_projections).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
        raise ValueError(f"p must be a number >= 1, got {p!r}")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be an integer >= 1, got {num_projections!r}")
    xt = torch.as_tensor(x).detach().to(torch.float64)
    yt = torch.as_tensor(y).detach().to(device=xt.device, dtype=torch.float64)
    if xt.ndim != 2 or yt.ndim != 2 or xt.shape[1] != yt.shape[1]:
        raise ValueError(
            "x and y must have shapes (N, d) and (M, d) with the same d, "
            f"got {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    if xt.shape[0] < 1 or yt.shape[0] < 1:
        raise ValueError("x and y must each hold at least one point")
    if not (torch.isfinite(xt).all() and torch.isfinite(yt).all()):
        raise ValueError("x and y must be finite (no NaN or inf)")

    directions = random_unit_directions(num_projections, xt.shape[1], generator).to(xt.device)
    xs = (xt @ directions.T).sort(dim=0).values  # (N, L): the sorted 1-D projections per direction
    ys = (yt @ directions.T).sort(dim=0).values  # (M, L)
    return float(_wasserstein_pp_1d(xs, ys, float(p)).mean() ** (1.0 / p))
