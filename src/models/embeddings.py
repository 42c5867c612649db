"""Sinusoidal timestep embedding (DDPM variant) and timestep validation shared by the backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM sinusoidal embedding of timestep indices.

    t: (B,) timestep indices (any numeric dtype; used as float32). Returns (B, dim) float32,
    laid out as [sin(t*f_0..f_{half-1}), cos(t*f_0..f_{half-1})] with
    f_i = exp(-ln(max_period) * i / (half - 1)), half = dim // 2, plus one zero column if dim is odd.

    This is the DDPM/TF ordering and divisor (SPEC §9.6); improved-diffusion uses divisor `half`
    and [cos, sin], which is not weight-compatible.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}")
    dim = int(dim)
    if dim < 2:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    half = dim // 2
    # With half == 1 the exponent i/(half-1) is 0/0; use the only sensible frequency, 1.
    denom = max(half - 1, 1)
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / denom)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def check_timesteps(t: Tensor, batch: int, owner: str) -> None:
    """Raise ValueError unless t is an integer tensor of shape (batch,)."""
    if not isinstance(t, Tensor):
        raise ValueError(
            f"{owner} expects t as an integer tensor of shape ({batch},), got {type(t).__name__}"
        )
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"{owner} expects integer timestep indices in [0, T-1] (dtype int64), got dtype {t.dtype}"
        )
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{owner} expects t of shape ({batch},) (one timestep index per example), got {tuple(t.shape)}"
        )
