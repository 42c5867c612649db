import math

import pytest
import torch

from src.diffusion import GaussianDiffusion, create_diffusion, make_beta_schedule
from tests.helpers.oracles import gaussian_eps_oracle


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion("linear", 1000, "fixed_large")


def test_q_sample_moments_match_closed_form(diffusion):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    abar = 1.0
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for idx in (0, 99, 499, 999):
        abar = math.prod(1 - b for b in betas[: idx + 1])
        t = torch.full((n,), idx, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, generator=g)
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=4 / math.sqrt(n))
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-5)
        mean, var, logvar = diffusion.q_mean_variance(x0[:2], t[:2])
        assert mean[0, 0].item() == pytest.approx(math.sqrt(abar) * 0.7, rel=1e-6)
        assert var[0, 0].item() == pytest.approx(1 - abar, rel=1e-5)
        assert logvar[0, 0].item() == pytest.approx(math.log(1 - abar), rel=1e-5)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), checked by the product of Gaussians and on a grid."""
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    d = GaussianDiffusion(betas, variance="fixed_small")
    x0, xt = 0.5, -0.3
    for idx in (1, 2, 3):
        beta = betas[idx].item()
        alpha = 1 - beta
        abar_prev = math.prod(1 - b for b in betas[:idx].tolist())
        precision = 1 / (1 - abar_prev) + alpha / beta
        mean_bayes = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * xt / beta) / precision
        # numeric Bayes on a grid
        grid = torch.linspace(-8, 8, 400_001, dtype=torch.float64)
        logp = (-(xt - math.sqrt(alpha) * grid) ** 2 / (2 * beta)
                - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
        w = torch.exp(logp - logp.max())
        w = w / w.sum()
        grid_mean = (w * grid).sum().item()
        grid_var = (w * (grid - grid_mean) ** 2).sum().item()

        t = torch.tensor([idx])
        mean, var, logvar = d.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), t)
        assert mean.item() == pytest.approx(mean_bayes, rel=1e-10)
        assert var.item() == pytest.approx(1 / precision, rel=1e-10)
        assert mean.item() == pytest.approx(grid_mean, abs=1e-6)
        assert var.item() == pytest.approx(grid_var, rel=1e-4)
        assert logvar.item() == pytest.approx(math.log(1 / precision), rel=1e-10)


def test_first_step_posterior_is_point_mass(diffusion):
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert diffusion.posterior_mean_coef2[0].item() == 0.0


def test_variance_choices_at_first_step():
    """fixed_large: log sigma^2 = log tilde-beta_2 at t=1 and log beta_t after; fixed_small: clipped log tilde-beta."""
    betas = make_beta_schedule("linear", 1000)
    large = GaussianDiffusion(betas, "fixed_large")
    small = GaussianDiffusion(betas, "fixed_small")
    tilde_beta_2 = betas[1].item() * (1 - (1 - betas[0].item())) / (1 - (1 - betas[0].item()) * (1 - betas[1].item()))
    assert tilde_beta_2 == pytest.approx(5.4532e-5, rel=1e-4)
    assert large.model_log_variance[0].item() == pytest.approx(math.log(tilde_beta_2), rel=1e-10)
    assert large.model_log_variance[0].item() == pytest.approx(-9.8167, abs=1e-4)
    assert torch.allclose(large.model_log_variance[1:], betas[1:].log())
    assert small.model_log_variance[0].item() == pytest.approx(math.log(tilde_beta_2), rel=1e-10)
    assert small.model_log_variance[5].item() == pytest.approx(small.posterior_variance[5].log().item())
    # decoder std at t=1 under fixed_large is 0.94 on the [0, 255] scale (the reference code's log-variance at t=1
    # is log tilde-beta_2)
    assert math.exp(0.5 * large.model_log_variance[0].item()) * 127.5 == pytest.approx(0.94, abs=0.01)


def test_unclipped_mean_is_eq_11(diffusion):
    torch.manual_seed(0)
    x_t = torch.randn(4, 3, 2, 2)
    eps = torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    out = diffusion.p_mean_variance(lambda x, tt: eps, x_t, t, clip_denoised=False)
    beta = diffusion.betas[t].float().view(-1, 1, 1, 1)
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    expected = (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
    assert torch.allclose(out["mean"], expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out["pred_x0"], (x_t - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-3, rtol=1e-4)


def test_clip_denoised_bounds_pred_x0(diffusion):
    x_t = torch.full((2, 1, 2, 2), 5.0)
    t = torch.tensor([999, 999])
    out = diffusion.p_mean_variance(lambda x, tt: -torch.ones_like(x), x_t, t, clip_denoised=True)
    assert out["pred_x0"].abs().max().item() <= 1.0


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_sampling_with_exact_predictor_recovers_the_data_distribution(variance):
    d = create_diffusion("linear", 1000, variance)
    m, s = 0.3, 0.5
    g = torch.Generator().manual_seed(1)
    x = d.sample(gaussian_eps_oracle(d, m, s), (20_000, 1), generator=g, clip_denoised=False)
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.05)


def test_training_loss_is_mean_over_dimensions(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 999])
    seen = {}

    def zero_model(x, tt):
        seen["x_t"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss = diffusion.training_losses(zero_model, x0, t, noise)
    assert loss.shape == (3,)
    assert torch.allclose(loss, noise.pow(2).mean(dim=(1, 2, 3)))
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["x_t"], diffusion.q_sample(x0, t, noise))

    def perfect(x, tt):
        return noise

    assert torch.allclose(diffusion.training_losses(perfect, x0, t, noise), torch.zeros(3))


def test_sampling_is_reproducible_and_reports_pred_x0(diffusion):
    model = gaussian_eps_oracle(diffusion, 0.0, 0.5)
    a = diffusion.sample(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3))
    b, snaps = diffusion.sample(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3), pred_x0_every=100)
    assert torch.equal(a, b)
    assert snaps.shape == (11, 2, 1, 3, 3)  # index 999, then 900, 800, ..., 0


def test_timesteps_are_zero_based(diffusion):
    t = diffusion.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    assert t.min().item() == 0 and t.max().item() == 999


def test_bad_inputs_raise(diffusion):
    with pytest.raises(ValueError, match="valid values are fixed_large"):
        GaussianDiffusion(make_beta_schedule("linear", 100), variance="learned_rang")
    with pytest.raises(ValueError, match="integer tensor"):
        diffusion.q_sample(torch.zeros(2, 3), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="model.out_channels"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, 6, 4, 4), torch.zeros(2, 3, 4, 4))
