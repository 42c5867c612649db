"""The paper's qualitative experiments as tensors: progressive generation (Fig. 6) and interpolation (Fig. 8/9)."""

from __future__ import annotations

import torch
from torch import Tensor

from src.diffusion.gaussian_diffusion import GaussianDiffusion, Model, randn


@torch.no_grad()
def progressive_generation(diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...], every: int,
                           generator: torch.Generator | None = None, device=None,
                           clip_denoised: bool = True) -> tuple[Tensor, list[int]]:
    """Predicted x0 along sampling chains: (K, B, ...) at code indices T-1, then every ``every``-th down to 0.

    Coarse features appear first and details last (paper §4.3, Fig. 6). Returns the snapshots and their
    paper timesteps (index + 1).
    """
    _, snapshots = diffusion.sample(model, shape, generator=generator, device=device,
                                    clip_denoised=clip_denoised, pred_x0_every=every)
    steps = [diffusion.num_timesteps] + [i + 1 for i in range(diffusion.num_timesteps - 1, -1, -1)
                                         if i % every == 0 and i != diffusion.num_timesteps - 1]
    return snapshots, steps


@torch.no_grad()
def interpolate(diffusion: GaussianDiffusion, model: Model, x0_a: Tensor, x0_b: Tensor, t: int,
                lambdas: list[float], seed: int = 0, clip_denoised: bool = True) -> Tensor:
    """Interpolate in the latent x_t (paper §4.4): encode both images with q(x_t|x_0), mix, decode.

    x0_a, x0_b: (B, ...) pairs; ``t`` the 0-based index to diffuse to (t + 1 forward steps). The encoding
    noise and the decoding noise are the same for every lambda, so only the mix changes along a row.
    Returns (len(lambdas), B, ...).
    """
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"start_t (the step to diffuse to) must be in [0, {diffusion.num_timesteps - 1}], got {t}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.full((x0_a.shape[0],), t, dtype=torch.long, device=x0_a.device)
    x_t_a = diffusion.q_sample(x0_a, idx, randn(x0_a.shape, gen, x0_a.device))
    x_t_b = diffusion.q_sample(x0_b, idx, randn(x0_b.shape, gen, x0_b.device))
    out = []
    for lam in lambdas:
        mixed = (1 - lam) * x_t_a + lam * x_t_b
        decode_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = mixed
        for step in diffusion.sample_progressive(model, mixed.shape, generator=decode_gen, device=mixed.device,
                                                 x_T=mixed, clip_denoised=clip_denoised, start_t=t):
            x = step["sample"]
        out.append(x)
    return torch.stack(out)
