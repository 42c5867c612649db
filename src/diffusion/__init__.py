"""Diffusion math: schedules, q(x_t|x_0), the posterior, the reverse process and sampling. No Lightning here."""

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
from src.diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample, respace, space_timesteps
from src.diffusion.schedules import SCHEDULES, make_beta_schedule

__all__ = ["GaussianDiffusion", "make_beta_schedule", "create_diffusion", "randn", "SCHEDULES", "VARIANCES",
           "PARAMETERIZATIONS", "OBJECTIVES", "LEARNED_VARIANCES",
           "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "mean_flat",
           "ClassifierFreeGuidance", "ConditionalModel",
           "SAMPLERS", "ddpm_sample", "ddim_sample", "respace", "space_timesteps"]


def create_diffusion(schedule: str = "linear", num_timesteps: int = 1000, variance: str = "fixed_large",
                     parameterization: str = "eps", objective: str = "simple", hybrid_weight: float = 0.001,
                     schedule_kwargs: dict | None = None) -> GaussianDiffusion:
    """Build a GaussianDiffusion from config values (the ``diffusion`` node of the Hydra config)."""
    betas = make_beta_schedule(schedule, int(num_timesteps), **dict(schedule_kwargs or {}))
    return GaussianDiffusion(betas, variance=variance, parameterization=parameterization, objective=objective,
                             hybrid_weight=hybrid_weight)
