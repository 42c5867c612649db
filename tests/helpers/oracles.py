"""Closed-form models shared by the math tests."""

from __future__ import annotations


def gaussian_eps_oracle(diffusion, m: float, s: float):
    """Exact E[eps | x_t] for x0 ~ N(m, s^2): the Bayes-optimal epsilon-predictor, indexed by 0-based t.

    x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar), so E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / var_t.
    """
    def model(x_t, t):
        abar = diffusion.alphas_cumprod[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * m) / (abar * s**2 + 1 - abar)
    return model
