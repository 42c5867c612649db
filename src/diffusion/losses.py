"""Pieces of the DDPM variational bound (Ho et al. 2020, eqs. 5 and 13), plain PyTorch, all in nats.

Conversion to bits/dim (``mean_flat(...) / ln 2``) is left to the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Half a bin of 8-bit data mapped to [-1, 1]: bin centres are 2/255 apart.
HALF_BIN = 1.0 / 255.0


def normal_kl(mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float,
              logvar2: Tensor | float) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (the reference normal_kl).

    KL = 0.5 * (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 * exp(-lv2)). Arguments broadcast; at least
    one must be a tensor. Log-variances (not variances) keep tiny variances such as tilde-beta_2 exact.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in (logvar1, logvar2))
    # Same formula with d = lv1 - lv2: exp(d) - 1 - d, written with expm1. Summing -1 + lv2 - lv1 + ...
    # left to right leaves a float32 rounding offset of ~1e-7 nats per term even when lv1 == lv2.
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Tanh approximation of the standard normal CDF used by the reference decoder (approx_standard_normal_cdf).

    Phi~(x) = 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))); max abs error vs the exact CDF is ~1.8e-4.
    It is monotone with limits 0 and 1, which is what makes the decoder's bin masses sum to one.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) in nats of 8-bit data x in [-1, 1] under a Gaussian discretized to bins (eq. 13; the reference
    discretized_gaussian_log_likelihood).

    Args:
        x: data on the bin centres v/127.5 - 1, any shape.
        means, log_scales: same shape as x (or broadcastable); ``log_scales`` is 0.5 * log-variance.
    Returns:
        log-probabilities of x's bin, shape of x. The first and last bins extend to -inf / +inf.
    """
    if x.shape != torch.broadcast_shapes(x.shape, means.shape, log_scales.shape):
        raise ValueError(f"means {tuple(means.shape)} / log_scales {tuple(log_scales.shape)} "
                         f"must broadcast to x's shape {tuple(x.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - HALF_BIN))
    # The 1e-12 floors keep log finite when a bin gets (numerically) no mass.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # Thresholds at +-0.999 (not +-1) so that edge pixels are caught despite rounding in v/127.5 - 1.
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
