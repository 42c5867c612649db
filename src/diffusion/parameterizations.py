"""What the network predicts: one small class per parameterization, chosen in the config by ``_target_``.

A parameterization says what the network learns to output (``target``) and how that output becomes a predicted
x0, a predicted epsilon and the mean of p_theta(x_{t-1} | x_t) (``to_x0``, ``to_eps``, ``to_mean``);
``GaussianDiffusion.predictions`` chains them, so training, every sampler and bits/dim work for each one.

Conventions (as in ``gaussian_diffusion``): ``t`` is a LongTensor (B,) of 0-based indices in [0, T-1] (paper
timestep = index + 1); ``output``, ``x0``, ``x_t`` and ``noise`` have the data's shape (B, ...), the variance
channels already split off. Coefficients come from ``diffusion.extract`` (float64 arrays, gathered at t).

A new one is a subclass that sets ``name`` and defines ``target`` and ``to_x0`` (README, "Adding a
parameterization or an objective"); the defaults of ``to_eps`` and ``to_mean`` go through the predicted x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from src.diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = ["Parameterization", "Eps", "X0", "Mean", "V"]


@dataclass(frozen=True)
class Parameterization:
    """Base class. Frozen dataclass: fields are config values, compared by value (``respace`` copies it)."""

    # shown in messages and logs; not used to select the class (``_target_`` does that)
    name: ClassVar[str] = "?"
    # whether a respaced chain (a subset of the T steps, improved DDPM) can use the output: False when the
    # output belongs to one step of the full chain
    respaceable: ClassVar[bool] = True

    def target(self, diffusion: GaussianDiffusion, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network should output for x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4)."""
        raise NotImplementedError

    def to_x0(self, diffusion: GaussianDiffusion, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The predicted x0, unclipped."""
        raise NotImplementedError

    def to_eps(self, diffusion: GaussianDiffusion, output: Tensor, pred_x0: Tensor, x_t: Tensor,
               t: Tensor) -> Tensor:
        """The predicted epsilon, from the unclipped ``pred_x0`` (the reference ``_predict_eps_from_xstart``)."""
        return diffusion.predict_eps_from_x0(x_t, t, pred_x0)

    def to_mean(self, diffusion: GaussianDiffusion, output: Tensor, pred_x0: Tensor, x_t: Tensor,
                t: Tensor) -> Tensor:
        """Mean of p_theta(x_{t-1} | x_t): the posterior mean (eq. 7) at ``pred_x0``, clipped when sampling asks."""
        return diffusion.q_posterior_mean_variance(pred_x0, x_t, t)[0]


@dataclass(frozen=True)
class Eps(Parameterization):
    """Predicts the noise epsilon (the paper's choice; L_simple is its unweighted MSE, eq. 14)."""

    name: ClassVar[str] = "eps"

    def target(self, diffusion, x0, x_t, t, noise):
        return noise

    def to_x0(self, diffusion, output, x_t, t):
        return diffusion.predict_x0_from_eps(x_t, t, output)

    def to_eps(self, diffusion, output, pred_x0, x_t, t):
        # the output itself, not recomputed from x0 (which loses precision where sqrt(1/abar - 1) is small)
        return output


@dataclass(frozen=True)
class X0(Parameterization):
    """Predicts the clean data x_0 (worse samples early in training, the paper's §3.2)."""

    name: ClassVar[str] = "x0"

    def target(self, diffusion, x0, x_t, t, noise):
        return x0

    def to_x0(self, diffusion, output, x_t, t):
        return output


@dataclass(frozen=True)
class Mean(Parameterization):
    """Predicts the posterior mean mu-tilde(x_t, x_0) itself (the paper's mu-tilde baseline, Table 2)."""

    name: ClassVar[str] = "mean"
    # the one-step mean of the full chain: a respaced chain's steps are longer (DDIM still works: it needs x0 only)
    respaceable: ClassVar[bool] = False

    def target(self, diffusion, x0, x_t, t, noise):
        return diffusion.q_posterior_mean_variance(x0, x_t, t)[0]

    def to_x0(self, diffusion, output, x_t, t):
        return diffusion.predict_x0_from_mean(x_t, t, output)

    def to_mean(self, diffusion, output, pred_x0, x_t, t):
        # the network's mean is used as is; only the reported x0 is clipped (reference p_mean_variance)
        return output


@dataclass(frozen=True)
class V(Parameterization):
    """Predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (velocity; Salimans & Ho 2022)."""

    name: ClassVar[str] = "v"

    def target(self, diffusion, x0, x_t, t, noise):
        return (diffusion.extract("sqrt_alphas_cumprod", t, x0) * noise
                - diffusion.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def to_x0(self, diffusion, output, x_t, t):
        return diffusion.predict_x0_from_v(x_t, t, output)
