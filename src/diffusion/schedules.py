"""Noise schedules beta_1..beta_T, built in float64 as the reference code does.

The reference code's "jsd" schedule (beta_T = 1) is left out: alpha-bar_T = 0 makes x0 from eps infinite.

Index i of the returned tensor holds beta_{i+1} (paper timesteps are 1-based, code indices 0-based).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# The paper's linear endpoints are stated for T = 1000; other T are rescaled by 1000/T
# (improved DDPM) so that alpha-bar_T, and hence L_T, stays near zero.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02


def _scaled_endpoints(num_timesteps: int, beta_start: float | None, beta_end: float | None) -> tuple[float, float]:
    scale = 1000.0 / num_timesteps
    start = LINEAR_BETA_START * scale if beta_start is None else beta_start
    end = LINEAR_BETA_END * scale if beta_end is None else beta_end
    return start, end


def linear(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """DDPM: beta linear from 1e-4 to 0.02 (for T = 1000)."""
    start, end = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def quadratic(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """Linear in sqrt(beta) between the linear schedule's endpoints, then squared."""
    start, end = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    return torch.linspace(math.sqrt(start), math.sqrt(end), num_timesteps, dtype=torch.float64) ** 2


def sigmoid(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """sigmoid(linspace(-6, 6)) rescaled to [beta_start, beta_end] (DDIM code)."""
    start, end = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    s = torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64))
    return s * (end - start) + start


def constant(num_timesteps: int, beta_end: float | None = None) -> torch.Tensor:
    """beta_t = beta_T for every t."""
    _, end = _scaled_endpoints(num_timesteps, None, beta_end)
    return torch.full((num_timesteps,), end, dtype=torch.float64)


def cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM: alpha-bar(t) = f(t/T)/f(0), f(u) = cos^2((u + s)/(1 + s) * pi/2).

    The cap at 0.999 only binds at the last step; without it beta_T = 1 and alpha-bar_T = 0.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def _warmup(fraction: float) -> Callable[..., torch.Tensor]:
    def schedule(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
        start, end = _scaled_endpoints(num_timesteps, beta_start, beta_end)
        betas = torch.full((num_timesteps,), end, dtype=torch.float64)
        n = int(num_timesteps * fraction)
        betas[:n] = torch.linspace(start, end, n, dtype=torch.float64)
        return betas

    schedule.__doc__ = f"Linear over the first {fraction:.0%} of steps, then constant beta_T (DDPM code)."
    return schedule


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "cosine": cosine,
    "quadratic": quadratic,
    "sigmoid": sigmoid,
    "constant": constant,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
}


def make_beta_schedule(name: str, num_timesteps: int, **kwargs) -> torch.Tensor:
    """Return beta_1..beta_T as a float64 tensor of shape (T,).

    ``name`` is one of ``SCHEDULES``; keyword arguments go to that schedule (e.g. ``beta_start``).
    """
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown noise schedule {name!r} (diffusion.schedule): valid names are {', '.join(SCHEDULES)}"
        )
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"diffusion.num_timesteps must be a positive integer, got {num_timesteps!r}")
    betas = SCHEDULES[name](num_timesteps, **kwargs)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            f"schedule {name!r} with T={num_timesteps} and {kwargs} gives betas outside (0, 1): the linear-type "
            "schedules scale the paper's endpoints by 1000/T, which breaks for small T; pass beta_end "
            "(diffusion.schedule_kwargs.beta_end) or use diffusion/schedule=cosine"
        )
    return betas
