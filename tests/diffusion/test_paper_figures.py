import pytest
import torch

from src.diffusion import create_diffusion
from src.diffusion.paper_figures import interpolate, progressive_generation


def point_mass_oracle(diffusion, m, calls=None):
    """Exact E[eps | x_t] when the data is the single point m: (x_t - sqrt(abar) m) / sqrt(1 - abar)."""
    def model(x_t, t):
        if calls is not None:
            calls.append(int(t[0]))
        abar = diffusion.alphas_cumprod[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - abar.sqrt() * m) / (1 - abar).sqrt()
    return model


def test_interpolation_decodes_from_the_chosen_step():
    d = create_diffusion("linear", 100, "fixed_small")
    calls = []
    a, b = torch.full((2, 1, 3, 3), 0.4), torch.full((2, 1, 3, 3), -0.2)
    out = interpolate(d, point_mass_oracle(d, 0.4, calls), a, b, t=29, lambdas=[0.0, 0.5, 1.0], clip_denoised=False)
    assert out.shape == (3, 2, 1, 3, 3)
    assert calls == list(range(29, -1, -1)) * 3  # t + 1 reverse steps per lambda, from index t down to 0
    # the model knows only the point 0.4: every decode lands on it exactly (closed form)
    assert torch.allclose(out, torch.full_like(out, 0.4), atol=1e-4)


def test_interpolation_holds_noise_fixed_across_lambda():
    d = create_diffusion("linear", 100, "fixed_large")
    model = point_mass_oracle(d, 0.0)
    a, b = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    first = interpolate(d, model, a, b, t=49, lambdas=[0.0, 1.0], seed=3, clip_denoised=False)
    again = interpolate(d, model, a, b, t=49, lambdas=[1.0, 0.0], seed=3, clip_denoised=False)
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])
    with pytest.raises(ValueError, match="start_t"):
        interpolate(d, model, a, b, t=100, lambdas=[0.5])


def test_progressive_generation_snapshots():
    d = create_diffusion("linear", 100, "fixed_large")
    snaps, steps = progressive_generation(d, point_mass_oracle(d, 0.25), (3, 1, 2, 2), every=25,
                                          generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert steps == [100, 76, 51, 26, 1]
    assert snaps.shape == (5, 3, 1, 2, 2)
    assert torch.allclose(snaps, torch.full_like(snaps, 0.25), atol=1e-4)
