"""Parameterizations (eps, x0, mean, v), objectives (simple, vlb, hybrid) and learned variances, checked
against closed forms: an oracle that outputs the exact target must reproduce x0, eps and the posterior."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from src.diffusion import OBJECTIVES, PARAMETERIZATIONS, VARIANCES, create_diffusion, ddim_sample, ddpm_sample
from src.diffusion.losses import mean_flat, normal_kl
from src.models.unet import UNet

T = 50


def valid(variance: str, objective: str) -> bool:
    learned = variance.startswith("learned")
    return (objective != "simple" or not learned) and (objective != "hybrid" or learned)


COMBOS = [c for c in itertools.product(PARAMETERIZATIONS, OBJECTIVES, VARIANCES) if valid(c[2], c[1])]


def closed_form_target(kind: str, x0, noise, t, diffusion):
    """The target written out from the definitions, independently of GaussianDiffusion.training_target."""
    abar = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    abar_prev = diffusion.alphas_cumprod_prev[t].float().reshape(-1, 1, 1, 1)
    beta = diffusion.betas[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    if kind == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    # eq. 7: mu-tilde = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar) x_t
    return (abar_prev.sqrt() * beta / (1 - abar) * x0
            + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * x_t)


class Oracle:
    """Outputs the exact target for the (x0, noise) that made x_t, plus fixed variance channels."""

    def __init__(self, kind, x0, noise, diffusion, var_value=None):
        self.kind, self.x0, self.noise, self.diffusion, self.var_value = kind, x0, noise, diffusion, var_value

    def __call__(self, x_t, t):
        out = closed_form_target(self.kind, self.x0, self.noise, t, self.diffusion)
        if self.var_value is None:
            return out
        return torch.cat([out, torch.full_like(out, self.var_value)], dim=1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 2, 4, 4, generator=g) * 1.6 - 0.8
    noise = torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 7, 20, 35, 49])
    return x0, noise, t


@pytest.mark.parametrize("kind", list(PARAMETERIZATIONS))
def test_exact_prediction_recovers_x0_eps_and_the_posterior(kind, batch):
    x0, noise, t = batch
    diffusion = create_diffusion("linear", T, "fixed_large", parameterization=kind)
    x_t = diffusion.q_sample(x0, t, noise)
    oracle = Oracle(kind, x0, noise, diffusion)
    out = diffusion.p_mean_variance(oracle, x_t, t, clip_denoised=False)
    true_mean, _, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    assert torch.allclose(out["pred_x0"], x0, atol=2e-4)
    # eps from x0 divides by sqrt(1/abar - 1), ~0.01 at index 0: looser there
    assert torch.allclose(out["pred_eps"][1:], noise[1:], atol=2e-3)
    assert torch.allclose(out["mean"], true_mean, atol=2e-4)
    assert torch.allclose(diffusion.training_losses(oracle, x0, t, noise), torch.zeros(6), atol=1e-9)


def test_v_target_and_its_inverse_are_the_definitions(batch):
    x0, noise, t = batch
    d = create_diffusion("cosine", T, "fixed_large", parameterization="v")
    x_t = d.q_sample(x0, t, noise)
    v = d.training_target(x0, x_t, t, noise)
    a = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    # x0 = sqrt(abar) x_t - sqrt(1 - abar) v, since abar + (1 - abar) = 1
    assert torch.allclose(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)


def test_mean_parameterization_uses_the_output_as_is_and_clips_only_the_reported_x0(batch):
    x0, noise, t = batch
    d = create_diffusion("linear", T, "fixed_small", parameterization="mean")
    x_t = d.q_sample(x0, t, noise)

    def far(x, tt):  # a mean whose implied x0 lies far outside [-1, 1]
        return torch.full_like(x, 5.0)

    out = d.p_mean_variance(far, x_t, t, clip_denoised=True)
    assert torch.equal(out["mean"], torch.full_like(x_t, 5.0))
    assert out["pred_x0"].abs().max() <= 1.0


def test_learned_range_interpolates_between_log_beta_and_log_tilde_beta(batch):
    x0, noise, t = batch
    d = create_diffusion("linear", T, "learned_range", objective="hybrid")
    x_t = d.q_sample(x0, t, noise)
    log_beta = torch.log(d.betas[t]).float().reshape(-1, 1, 1, 1)
    log_tilde = d.posterior_log_variance_clipped[t].float().reshape(-1, 1, 1, 1)
    for v, expected in [(1.0, log_beta), (-1.0, log_tilde), (0.0, (log_beta + log_tilde) / 2)]:
        out = d.p_mean_variance(Oracle("eps", x0, noise, d, v), x_t, t)
        assert torch.allclose(out["log_variance"], expected.expand_as(x_t), atol=1e-5)
        assert torch.allclose(out["variance"], expected.exp().expand_as(x_t), rtol=1e-5)


def test_learned_variance_is_the_raw_log_variance(batch):
    x0, noise, t = batch
    d = create_diffusion("linear", T, "learned", objective="vlb")
    x_t = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(Oracle("eps", x0, noise, d, -3.5), x_t, t)
    assert torch.allclose(out["log_variance"], torch.full_like(x_t, -3.5))


def test_vlb_objective_is_the_gaussian_kl_in_bits(batch):
    """Exact mean: the KL term reduces to its variance part, 0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2)) / ln 2;
    with the true posterior log-variance learned exactly it is 0."""
    x0, noise, t = batch
    keep = t > 0
    x0, noise, t = x0[keep], noise[keep], t[keep]
    d = create_diffusion("linear", T, "fixed_large", objective="vlb")
    loss = d.training_losses(Oracle("eps", x0, noise, d), x0, t, noise)
    lv1 = d.posterior_log_variance_clipped[t]
    lv2 = d.model_log_variance[t]
    expected = 0.5 * (-1 + lv2 - lv1 + torch.exp(lv1 - lv2)) / math.log(2)
    assert torch.allclose(loss.double(), expected, rtol=1e-4)

    d = create_diffusion("linear", T, "learned", objective="vlb")
    x_t = d.q_sample(x0, t, noise)

    class ExactVariance(Oracle):
        def __call__(self, x, tt):
            eps = noise
            logvar = d.posterior_log_variance_clipped[tt].float().reshape(-1, 1, 1, 1).expand_as(x)
            return torch.cat([eps, logvar], dim=1)

    assert torch.allclose(d.training_losses(ExactVariance("eps", x0, noise, d), x0, t, noise),
                          torch.zeros(len(t)), atol=1e-5)
    del x_t


def test_vlb_at_index_0_is_the_decoder_nll(batch):
    x0, noise, _ = batch
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid
    t = torch.zeros(6, dtype=torch.long)
    d = create_diffusion("linear", T, "fixed_large", objective="vlb")
    loss = d.training_losses(Oracle("eps", x0, noise, d), x0, t, noise)
    # decoder std 0.94/255: the bin of half-width 1/255 around the exact mean holds ~0.71 of the mass
    sigma = math.exp(0.5 * d.model_log_variance[0].item())
    mass = math.erf((1 / 255) / (sigma * math.sqrt(2)))
    x_t = d.q_sample(x0, t, noise)
    mean = d.q_posterior_mean_variance(x0, x_t, t)[0]
    inside = ((mean - x0).abs() < 1e-4).all()
    assert inside
    assert torch.allclose(loss, torch.full((6,), -math.log2(mass)), atol=2e-3)


def test_hybrid_is_mse_plus_weighted_bound_with_the_mean_frozen(batch):
    x0, noise, t = batch
    d = create_diffusion("linear", T, "learned_range", objective="hybrid")
    out = torch.randn(6, 4, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise, return_terms=True)
    assert torch.allclose(terms["mse"], mean_flat((noise - out[:, :2]) ** 2))
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"])
    terms["loss"].sum().backward()
    # the mean channels get exactly the MSE's gradient: the bound does not reach them
    expected = -2 * (noise - out[:, :2].detach()) / out[:, :2][0].numel()
    assert torch.allclose(out.grad[:, :2], expected, atol=1e-6)
    assert out.grad[:, 2:].abs().sum() > 0


def test_vb_term_matches_normal_kl_for_learned_variance(batch):
    x0, noise, t = batch
    d = create_diffusion("linear", T, "learned", objective="vlb")
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(6, 4, 4, 4)
    loss = d.training_losses(lambda x, tt: out, x0, t, noise)
    # independent route for t > 0: mean from eq. 11, KL to the posterior
    abar = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    beta = d.betas[t].float().reshape(-1, 1, 1, 1)
    mu = (x_t - beta / (1 - abar).sqrt() * out[:, :2]) / (1 - beta).sqrt()
    true_mean, _, true_lv = d.q_posterior_mean_variance(x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_lv, mu, out[:, 2:])) / math.log(2)
    assert torch.allclose(loss[1:], kl[1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variance,objective,match", [
    ("learned", "simple", "no gradient"), ("learned_range", "simple", "no gradient"),
    ("fixed_large", "hybrid", "only trains a learned"), ("fixed_small", "hybrid", "only trains a learned"),
])
def test_combinations_that_cannot_train_are_clear_errors(variance, objective, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion("linear", T, variance, objective=objective)


def test_unknown_values_list_the_options():
    with pytest.raises(ValueError, match="valid values are eps"):
        create_diffusion("linear", T, parameterization="epsilon")
    with pytest.raises(ValueError, match="valid values are simple"):
        create_diffusion("linear", T, objective="kl")


def test_learned_variance_needs_twice_the_channels():
    d = create_diffusion("linear", T, "learned_range", objective="hybrid")
    with pytest.raises(ValueError, match="twice its input's channels"):
        d.training_losses(lambda x, tt: x, torch.zeros(2, 3, 4, 4))


def test_mean_parameterization_refuses_a_respaced_chain():
    d = create_diffusion("linear", T, parameterization="mean")
    net = UNet(in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=4,
               num_groups=4)
    with pytest.raises(ValueError, match="sample all T steps"):
        ddpm_sample(d, net, (2, 1, 4, 4), steps=10)


@pytest.mark.parametrize("parameterization,objective,variance", COMBOS)
def test_every_combination_trains_samples_and_evaluates(parameterization, objective, variance, one_thread):
    torch.manual_seed(0)
    steps = 30
    d = create_diffusion("linear", steps, variance, parameterization=parameterization, objective=objective)
    net = UNet(in_channels=1, out_channels=d.output_channels_factor, ch=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(2,), resolution=4, num_groups=4, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x0 = torch.round((torch.rand(8, 1, 4, 4) * 2 - 1) * 127.5) / 127.5
    for _ in range(3):
        opt.zero_grad()
        loss = d.training_losses(net, x0).mean()
        assert torch.isfinite(loss)
        loss.backward()
        # every output channel gets a gradient (the variance ones too when learned)
        assert net.conv_out.weight.grad.flatten(1).abs().sum(1).gt(0).all()
        opt.step()
    net.eval()
    g = torch.Generator().manual_seed(1)
    assert torch.isfinite(ddpm_sample(d, net, (2, 1, 4, 4), generator=g)).all()
    if parameterization != "mean":
        assert torch.isfinite(ddpm_sample(d, net, (2, 1, 4, 4), steps=4, generator=g)).all()
    assert torch.isfinite(ddim_sample(d, net, (2, 1, 4, 4), steps=3, generator=g)).all()
    bpd = d.bits_per_dim(net, x0[:2], generator=g)
    assert torch.isfinite(bpd["total"]).all() and bpd["terms"].shape == (2, steps)
