"""Training objectives: one small callable class per objective, chosen in the config by ``_target_``.

``objective(diffusion, model_output, x0, x_t, t, noise)`` returns per-example terms, each of shape (B,): ``loss``
(what training averages, Algorithm 1) and its parts. ``GaussianDiffusion.training_losses`` draws t and the noise,
makes x_t (eq. 4), calls the network once and hands its output here.

Conventions (as in ``gaussian_diffusion``): ``t`` is a LongTensor (B,) of 0-based indices in [0, T-1] (paper
timestep = index + 1; index 0 is the decoder step); ``x0``, ``x_t`` and ``noise`` have the data's shape (B, ...);
``model_output`` is the network's output as it returned it (bf16 under autocast), with twice the data's channels
(dim 1) when the variance is learned: ``split_float`` splits it and casts to float32, as the losses are computed.

A new objective is a subclass that sets ``name`` and defines ``__call__`` (README, "Adding a parameterization
or an objective"); ``mse_term`` and ``vb_term`` are the two building blocks of the ones here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from src.diffusion.losses import mean_flat

if TYPE_CHECKING:
    from src.diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = ["Objective", "Simple", "Vlb", "Hybrid", "split_float", "mse_term", "vb_term", "check_hybrid_weight"]


def split_float(diffusion: GaussianDiffusion, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
    """The parameterization's channels and the variance channels (None for a fixed variance), in float32."""
    out, var = diffusion.split_output(model_output, x_t)
    return out.float(), (var.float() if var is not None else None)


def mse_term(diffusion: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
             noise: Tensor) -> Tensor:
    """MSE to the parameterization's target, averaged over dimensions (B,): L_simple (eq. 14) for eps.

    The mean over pixels (not the sum) follows the reference code; gradient clipping at 1.0 assumes it.
    """
    out, _ = split_float(diffusion, model_output, x_t)
    target = diffusion.parameterization.target(diffusion, x0, x_t, t, noise).float()
    return mean_flat((target - out) ** 2)


def vb_term(diffusion: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
            freeze_mean: bool = False) -> Tensor:
    """The bound's term at t in bits/dim (B,), without clipping x0 (the reference code's ``kl`` loss): the KL to
    the posterior for t > 0, the discretized decoder NLL at index 0. ``freeze_mean`` detaches the prediction, so
    only the variance channels get the gradient (improved DDPM's L_hybrid)."""
    out, var = split_float(diffusion, model_output, x_t)
    if freeze_mean:
        out = out.detach()
    p = diffusion.predictions(out, var, x_t.float(), t, clip_denoised=False)
    return diffusion.bound_term(p, x0.float(), x_t.float(), t)


def check_hybrid_weight(value) -> float:
    """``diffusion.hybrid_weight`` as a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"diffusion.hybrid_weight must be a finite number >= 0 (lambda of diffusion/objective=hybrid, "
                         f"improved DDPM: 0.001), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Objective:
    """Base class. Frozen dataclass: fields are config values, compared by value (``respace`` copies it)."""

    # shown in messages and logs; not used to select the class (``_target_`` does that)
    name: ClassVar[str] = "?"
    # the loss holds the bound's discretized decoder NLL at index 0 (eq. 13), defined for 8-bit data on [-1, 1]:
    # src.train refuses continuous data for it
    discrete_data: ClassVar[bool] = False
    # terms besides ``loss`` that training logs as train/<term> (the parts of a composite loss)
    logged_terms: ClassVar[tuple[str, ...]] = ()

    def check(self, diffusion: GaussianDiffusion) -> None:
        """ValueError naming the config keys when this objective cannot train ``diffusion`` (e.g. its variance)."""

    def __call__(self, diffusion: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                 noise: Tensor) -> dict[str, Tensor]:
        """Per-example terms, each (B,): ``loss`` first, then its parts."""
        raise NotImplementedError


@dataclass(frozen=True)
class Simple(Objective):
    """Unweighted MSE to the parameterization's target (L_simple for eps, eq. 14; the paper's best FID)."""

    name: ClassVar[str] = "simple"

    def check(self, diffusion):
        if diffusion.learns_variance:
            raise ValueError(
                f"diffusion.variance={diffusion.variance} with diffusion.objective={self.name}: the MSE gives the "
                "variance channels no gradient, so they would stay untrained; use diffusion/objective=hybrid "
                "(improved DDPM) or vlb, or a fixed variance (fixed_large, fixed_small)")

    def __call__(self, diffusion, model_output, x0, x_t, t, noise):
        mse = mse_term(diffusion, model_output, x0, x_t, t, noise)
        return {"loss": mse, "mse": mse}


@dataclass(frozen=True)
class Vlb(Objective):
    """The true bound: the KL term at the sampled t in bits/dim, the decoder NLL at index 0 (eq. 5; the reference
    code's ``kl`` loss). Over uniform t it estimates (L - L_T) / T. Trains a learned variance too."""

    name: ClassVar[str] = "vlb"
    discrete_data: ClassVar[bool] = True

    def __call__(self, diffusion, model_output, x0, x_t, t, noise):
        vb = vb_term(diffusion, model_output, x0, x_t, t)
        return {"loss": vb, "vb": vb}


@dataclass(frozen=True)
class Hybrid(Objective):
    """Improved DDPM's L_hybrid: simple + weight * T * the bound's term with the prediction detached, so the
    bound trains only the variance channels (Nichol & Dhariwal 2021, lambda = weight = 0.001)."""

    name: ClassVar[str] = "hybrid"
    discrete_data: ClassVar[bool] = True
    logged_terms: ClassVar[tuple[str, ...]] = ("mse", "vb")  # to watch the variance being learned

    weight: float = 0.001

    def __post_init__(self):
        object.__setattr__(self, "weight", check_hybrid_weight(self.weight))

    def check(self, diffusion):
        if not diffusion.learns_variance:
            raise ValueError(
                f"diffusion.objective={self.name} adds the bound with the mean frozen, which only trains a learned "
                f"variance; with diffusion.variance={diffusion.variance} it is objective=simple plus a constant: "
                "use diffusion/variance=learned_range (or learned), or diffusion/objective=simple")

    def __call__(self, diffusion, model_output, x0, x_t, t, noise):
        mse = mse_term(diffusion, model_output, x0, x_t, t, noise)
        vb = vb_term(diffusion, model_output, x0, x_t, t, freeze_mean=True)
        return {"loss": mse + self.weight * diffusion.num_timesteps * vb, "mse": mse, "vb": vb}
