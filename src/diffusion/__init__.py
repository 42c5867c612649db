"""Diffusion math: schedules, q(x_t|x_0), the posterior, the reverse process and sampling. No Lightning here."""

import math

from src.diffusion.gaussian_diffusion import (
    LEARNED_VARIANCES,
    OBJECTIVES,
    PARAMETERIZATIONS,
    VARIANCES,
    GaussianDiffusion,
    randn,
)
from src.diffusion.guidance import ClassifierFreeGuidance, ConditionalModel
from src.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from src.diffusion.samplers import DDIM, Ancestral, Sampler, ddim_sample, ddpm_sample, respace, space_timesteps
from src.diffusion.schedules import SCHEDULES, make_beta_schedule

__all__ = ["GaussianDiffusion", "make_beta_schedule", "create_diffusion", "randn", "SCHEDULES", "VARIANCES",
           "PARAMETERIZATIONS", "OBJECTIVES", "LEARNED_VARIANCES",
           "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "mean_flat",
           "ClassifierFreeGuidance", "ConditionalModel",
           "Sampler", "Ancestral", "DDIM", "ddpm_sample", "ddim_sample", "respace", "space_timesteps"]


def _check_num_timesteps(value) -> int:
    """``diffusion.num_timesteps`` as an int >= 2 (an integral float such as 1000.0 counts as 1000)."""
    integral = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, int) or integral):
        raise ValueError(f"diffusion.num_timesteps must be an integer (T, the number of diffusion steps; the paper "
                         f"uses 1000), got {value!r}")
    if value < 2:
        # tilde-beta_1 = 0 has no log, so the variance at t=1 is taken from step 2 (reference code)
        raise ValueError(f"diffusion.num_timesteps must be >= 2, got {value!r}: the reverse process borrows step 2's "
                         "variance for its last step (t=1), so T=1 has none; the paper uses T=1000")
    return int(value)


def _check_hybrid_weight(value) -> float:
    """``diffusion.hybrid_weight`` as a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"diffusion.hybrid_weight must be a finite number >= 0 (lambda of diffusion/objective=hybrid, "
                         f"improved DDPM: 0.001), got {value!r}")
    return float(value)


def create_diffusion(schedule: str = "linear", num_timesteps: int = 1000, variance: str = "fixed_large",
                     parameterization: str = "eps", objective: str = "simple", hybrid_weight: float = 0.001,
                     schedule_kwargs: dict | None = None) -> GaussianDiffusion:
    """Build a GaussianDiffusion from config values (the ``diffusion`` node of the Hydra config).

    ValueError naming the config key for a ``num_timesteps`` that is not an integer >= 2 or a ``hybrid_weight``
    that is not a finite number >= 0.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    hybrid_weight = _check_hybrid_weight(hybrid_weight)
    betas = make_beta_schedule(schedule, num_timesteps, **dict(schedule_kwargs or {}))
    return GaussianDiffusion(betas, variance=variance, parameterization=parameterization, objective=objective,
                             hybrid_weight=hybrid_weight)
