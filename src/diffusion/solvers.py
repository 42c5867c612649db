"""Fast solvers of the probability-flow ODE (and its SDE) for a trained DDPM: DPM-Solver++(2M), its SDE variant,
UniPC-bh2 and EDM's Heun. Plain PyTorch.

Frames (Lu et al. 2022b; Karras et al. 2022). The VP state is x_t = alpha_t x_0 + sigma_t eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and half log-SNR lambda_t = log(alpha_t / sigma_t). EDM's Heun
works in the VE frame x~ = x / alpha_t with noise level sigma~_t = sigma_t / alpha_t. Every solver is driven by the
data prediction D(x_t, t) = predicted x_0, so it works for each parameterization (eps, x0, v and the one-step mean,
from which x_0 is recovered exactly at any t); a learned variance's channels are ignored.

Noise levels. A discrete model knows only its T trained levels, so every spacing is a list of N distinct trained
indices (noisiest first): a continuous spacing (``logsnr``, ``karras``) is snapped to the nearest trained level in
log sigma~ and that level's exact alpha, sigma are used everywhere (the model, the coefficients), so the solver
sees one consistent discretisation. The chain then ends with a jump to sigma = 0 (abar := 1), which returns the
last data prediction, as DDIM's final step does.

Spacings (``spaced_indices``):
- ``uniform``: evenly spaced, trailing: round(T - k T / N) - 1, k = 0..N-1 (starts at T - 1; diffusers' "trailing");
- ``quadratic``: DDIM's, floor((k sqrt(0.8 T) / (N - 1))^2), denser at low noise;
- ``logsnr``: uniform in lambda between the noisiest and the cleanest trained level (DPM-Solver's "logSNR");
- ``karras``: sigma~_k = (s_max^(1/7) + k / (N - 1) (s_min^(1/7) - s_max^(1/7)))^7 between the schedule's
  largest and smallest sigma~ (EDM eq. 5, rho = 7).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from src.diffusion.gaussian_diffusion import GaussianDiffusion, Model, apply_x0_rule, randn
from src.utils.progress import track

__all__ = ["SPACINGS", "spaced_indices", "DynamicThreshold", "Denoiser", "dpmpp_2m_sample", "unipc_sample",
           "heun_sample"]

SPACINGS = ("uniform", "quadratic", "logsnr", "karras")


# ------------------------------------------------------------------ noise levels
def _snap(targets: list[float], levels: list[float]) -> list[int]:
    """Index of the nearest value of the increasing ``levels`` for each of the decreasing ``targets``, made
    strictly decreasing (a collision moves to the next free level, so N targets give N distinct indices)."""
    count, n = len(levels), len(targets)
    snapped = []
    for v in targets:
        j = bisect.bisect_left(levels, v)
        snapped.append(j if j == 0 or (j < count and levels[j] - v < v - levels[j - 1]) else j - 1)
    out: list[int] = []
    for k, j in enumerate(snapped):
        j = max(min(j, count - 1 - k), n - 1 - k)  # room for the levels above and below
        out.append(j if not out else min(j, out[-1] - 1))
    return out


def spaced_indices(alphas_cumprod: Tensor, steps: int, spacing: str) -> list[int]:
    """``steps`` distinct trained 0-based indices in [0, T-1], noisiest first, spread by ``spacing`` (module doc)."""
    T = int(alphas_cumprod.numel())
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} is not one of {', '.join(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"sampler.steps={steps!r} must be an integer in [1, {T}] (the model has T={T} levels)")
    n = steps
    if spacing == "uniform":
        return [round(Fraction(T * (n - k), n)) - 1 for k in range(n)]
    if spacing == "quadratic":
        top = math.sqrt(0.8 * T)
        targets = [(top * k / max(n - 1, 1)) ** 2 for k in range(n)][::-1]
        return _snap(targets, [float(j) for j in range(T)])
    abar = alphas_cumprod.to(torch.float64)
    log_sigma = (0.5 * (torch.log1p(-abar) - torch.log(abar))).tolist()  # log sigma~, increasing in t
    hi, lo = log_sigma[-1], log_sigma[0]
    if n == 1:
        return [T - 1]
    if spacing == "logsnr":
        targets = [hi + k / (n - 1) * (lo - hi) for k in range(n)]
    else:  # karras, rho = 7
        s_max, s_min = math.exp(hi / 7), math.exp(lo / 7)
        targets = [7 * math.log(s_max + k / (n - 1) * (s_min - s_max)) for k in range(n)]
    return _snap(targets, log_sigma)


@dataclass(frozen=True)
class _Levels:
    """alpha, sigma, lambda at the chosen indices, then the final clean level (alpha 1, sigma 0, lambda inf)."""

    indices: list[int]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]

    @classmethod
    def of(cls, diffusion: GaussianDiffusion, indices: list[int]) -> _Levels:
        abar = diffusion.alphas_cumprod.to(torch.float64)
        alpha = [math.sqrt(abar[i].item()) for i in indices] + [1.0]
        sigma = [math.sqrt(1.0 - abar[i].item()) for i in indices] + [0.0]
        lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1], strict=True)] + [math.inf]
        return cls(list(indices), alpha, sigma, lam)


# ------------------------------------------------------------------ data prediction
@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) of a predicted x_0: per sample, s = the
    ``percentile`` quantile of |x_0|, raised to at least 1 (and capped at ``max_value`` when set); x_0 is clipped to
    [-s, s] and divided by s. With s = 1 it is plain clipping to [-1, 1]; DPM-Solver++ recommends it for guided
    sampling, where large guidance pushes x_0 out of range."""

    percentile: float = 0.995
    max_value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.percentile) <= 1.0:
            raise ValueError(f"sampler.threshold={self.percentile!r} is the percentile of |x0| to threshold at: "
                             "a number in (0, 1], e.g. 0.995 (or null for plain clipping)")
        if self.max_value is not None and not float(self.max_value) >= 1.0:
            raise ValueError(f"sampler.threshold_max={self.max_value!r} must be >= 1 (or null: no cap)")

    def __call__(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs().float(), float(self.percentile), dim=1).clamp(min=1.0)
        if self.max_value is not None:
            s = s.clamp(max=float(self.max_value))
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s


class Denoiser:
    """D(x_t, i): the model's predicted x_0 at trained index i (clipped, thresholded or left as is), counting
    network evaluations in ``nfe``."""

    def __init__(self, model: Model, diffusion: GaussianDiffusion, clip_denoised=True) -> None:
        self.model, self.diffusion, self.clip_denoised = model, diffusion, clip_denoised
        self.nfe = 0

    def __call__(self, x: Tensor, index: int) -> Tensor:
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        output, _ = self.diffusion.split_output(self.model(x, t), x)
        self.nfe += 1
        return apply_x0_rule(self.diffusion.parameterization.to_x0(self.diffusion, output, x, t), self.clip_denoised)


# ------------------------------------------------------------------ solvers
@torch.no_grad()
def dpmpp_2m_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: Tensor, indices: list[int],
                    sde: bool = False, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; the midpoint form of diffusers/k-diffusion) from x_T at
    ``indices[0]`` down to sigma = 0. With r = h_prev / h the data prediction is extrapolated,
    D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, then (h = lambda_next - lambda_i):

        ODE: x_next = (sigma_next / sigma_i) x - alpha_next (e^-h - 1) D'
        SDE: x_next = (sigma_next / sigma_i) e^-h x + alpha_next (1 - e^-2h) D' + sigma_next sqrt(1 - e^-2h) z

    The first step and the final jump to sigma = 0 are first order (D' = D_i). The SDE draws one z of x's shape per
    step from ``generator`` (the last one unused: its coefficient is 0).
    """
    lv = _Levels.of(diffusion, indices)
    x, previous = x_T, None
    for k in track(range(len(indices)), desc="DPM-Solver++ sampling", unit="steps", enabled=progress):
        d = denoise(x, indices[k])
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if sde else None
        if lv.sigma[k + 1] == 0.0:
            x, previous = d, d
            continue
        h = lv.lam[k + 1] - lv.lam[k]
        if previous is None:
            extrapolated = d
        else:
            r = (lv.lam[k] - lv.lam[k - 1]) / h
            extrapolated = (1.0 + 0.5 / r) * d - (0.5 / r) * previous
        ratio = lv.sigma[k + 1] / lv.sigma[k]
        if sde:
            x = (ratio * math.exp(-h)) * x + (-lv.alpha[k + 1] * math.expm1(-2.0 * h)) * extrapolated \
                + (lv.sigma[k + 1] * math.sqrt(-math.expm1(-2.0 * h))) * noise
        else:
            x = ratio * x + (-lv.alpha[k + 1] * math.expm1(-h)) * extrapolated
        previous = d
    return x


def _unipc_b(h: float) -> tuple[float, float, float]:
    """UniPC-bh2's phi_1 term e^-h - 1, B(h) = e^-h - 1 and the right-hand side (b_1, b_2) of its order-2 system
    (data prediction: hh = -h; the reference recursion of phi_k)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    phi = h_phi_1 / hh - 1.0
    b1 = phi / h_phi_1
    phi = phi / hh - 0.5
    b2 = 2.0 * phi / h_phi_1
    return h_phi_1, b1, b2


@torch.no_grad()
def unipc_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: Tensor, indices: list[int],
                 progress: bool = False) -> Tensor:
    """UniPC with B(h) = e^h - 1 ("bh2", Zhao et al. 2023), order 2, data prediction: each evaluation D_k at the
    predicted x_k first corrects x_k (UniC, reusing D_k: no extra evaluation), then predicts x_{k+1} (UniP). Order 1
    on the first step and the final jump to sigma = 0 (diffusers' ``lower_order_final``); no correction after the
    last prediction. The coefficients follow diffusers' ``UniPCMultistepScheduler`` (rho_p = 1/2 at order 2).
    """
    lv = _Levels.of(diffusion, indices)
    n = len(indices)
    x, last_x, history, order = x_T, None, [], 1
    for k in track(range(n), desc="UniPC sampling", unit="steps", enabled=progress):
        d = denoise(x, indices[k])
        if last_x is not None:  # UniC: correct the step k-1 -> k that `order` predicted
            h = lv.lam[k] - lv.lam[k - 1]
            h_phi_1, b1, b2 = _unipc_b(h)
            base = (lv.sigma[k] / lv.sigma[k - 1]) * last_x - (lv.alpha[k] * h_phi_1) * history[-1]
            if order == 1:
                correction = 0.5 * (d - history[-1])
            else:
                r = (lv.lam[k - 2] - lv.lam[k - 1]) / h
                rho0 = (b1 - b2) / (1.0 - r)
                correction = (rho0 / r) * (history[-2] - history[-1]) + (b1 - rho0) * (d - history[-1])
            x = base - (lv.alpha[k] * h_phi_1) * correction
        history = [*history[-1:], d]
        order = min(2, n - k, k + 1)
        last_x = x
        if lv.sigma[k + 1] == 0.0:
            x = d
            continue
        h = lv.lam[k + 1] - lv.lam[k]
        h_phi_1 = math.expm1(-h)
        x = (lv.sigma[k + 1] / lv.sigma[k]) * x - (lv.alpha[k + 1] * h_phi_1) * d
        if order == 2:  # UniP-2: rho_p = 1/2 times the divided difference of the last two predictions
            r = (lv.lam[k - 1] - lv.lam[k]) / h
            x = x - (lv.alpha[k + 1] * h_phi_1 * 0.5 / r) * (history[-2] - d)
    return x


@torch.no_grad()
def heun_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: Tensor, indices: list[int],
                progress: bool = False) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1 without churn) in the VE frame
    x~ = x / alpha over the noise levels sigma~ of ``indices``, then 0: an Euler step with d = (x~ - D) / sigma~,
    corrected with the slope at its end point except on the last step to sigma~ = 0. NFE = 2N - 1."""
    lv = _Levels.of(diffusion, indices)
    tilde = [s / a for s, a in zip(lv.sigma, lv.alpha, strict=True)]
    x = x_T / lv.alpha[0]
    n = len(indices)
    for k in track(range(n), desc="Heun sampling", unit="steps", enabled=progress):
        slope = (x - denoise(lv.alpha[k] * x, indices[k])) / tilde[k]
        dt = tilde[k + 1] - tilde[k]
        euler = x + dt * slope
        if tilde[k + 1] == 0.0:
            x = euler
            continue
        slope_next = (euler - denoise(lv.alpha[k + 1] * euler, indices[k + 1])) / tilde[k + 1]
        x = x + (0.5 * dt) * (slope + slope_next)
    return x
