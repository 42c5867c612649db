"""Diffusion math: schedules, q(x_t|x_0), the posterior, the reverse process and sampling. No Lightning here."""

import math

from src.diffusion.gaussian_diffusion import LEARNED_VARIANCES, VARIANCES, GaussianDiffusion, randn
from src.diffusion.guidance import ClassifierFreeGuidance, ConditionalModel
from src.diffusion.legacy import OBJECTIVES, PARAMETERIZATIONS, objective_from, parameterization_from
from src.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from src.diffusion.objectives import Hybrid, Objective, Simple, Vlb, check_hybrid_weight
from src.diffusion.parameterizations import X0, Eps, Mean, Parameterization, V
from src.diffusion.samplers import DDIM, Ancestral, Sampler, ddim_sample, ddpm_sample, respace, space_timesteps
from src.diffusion.schedules import SCHEDULES, make_beta_schedule

__all__ = ["GaussianDiffusion", "make_beta_schedule", "create_diffusion", "randn", "SCHEDULES", "VARIANCES",
           "PARAMETERIZATIONS", "OBJECTIVES", "LEARNED_VARIANCES",
           "Parameterization", "Eps", "X0", "Mean", "V", "Objective", "Simple", "Vlb", "Hybrid",
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


def create_diffusion(schedule: str = "linear", num_timesteps: int = 1000, variance: str = "fixed_large",
                     parameterization: Parameterization | str = "eps", objective: Objective | str = "simple",
                     hybrid_weight: float = 0.001, schedule_kwargs: dict | None = None) -> GaussianDiffusion:
    """Build a GaussianDiffusion from config values (the ``diffusion`` node of the Hydra config).

    ``parameterization`` and ``objective`` are objects (config nodes with ``_target_``, which Hydra instantiates
    first) or, for configs and checkpoints written before they were objects, their names (``eps``, ``hybrid``, ...;
    ``src.diffusion.legacy``). ``hybrid_weight`` is lambda of the hybrid objective: configs/diffusion/objective/
    hybrid.yaml hands it to ``Hybrid``, and an old config's name ``hybrid`` takes it here.
    ValueError naming the config key for a ``num_timesteps`` that is not an integer >= 2, a ``hybrid_weight``
    that is not a finite number >= 0, or an unknown name.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    hybrid_weight = check_hybrid_weight(hybrid_weight)
    betas = make_beta_schedule(schedule, num_timesteps, **dict(schedule_kwargs or {}))
    return GaussianDiffusion(betas, variance=variance, parameterization=parameterization_from(parameterization),
                             objective=objective_from(objective, hybrid_weight))
