"""The variational bound in bits/dim (Ho et al. 2020 eqs. 5 and 13; the reference calc_bpd_loop), checked against
closed forms computed here."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from src.diffusion import (
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    make_beta_schedule,
    mean_flat,
    normal_kl,
)
from tests.helpers.oracles import gaussian_eps_oracle

pytestmark = pytest.mark.usefixtures("one_thread")

LN2 = math.log(2.0)
CENTRES = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 8-bit grid on [-1, 1]


def exact_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def tanh_cdf(u: float) -> float:
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


# ------------------------------------------------------------------ losses.py
def test_normal_kl_closed_form_and_torch():
    e = math.e
    cases = [  # (m1, lv1, m2, lv2, KL by hand)
        (0.0, 0.0, 0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0, 0.0, 0.5),
        (0.0, 2.0, 0.0, 0.0, 0.5 * (e**2 - 3.0)),
        (0.0, 0.0, 0.0, 2.0, 0.5 * (1.0 + e**-2)),
        (0.3, math.log(0.25), -0.2, math.log(4.0), math.log(2.0 / 0.5) + (0.25 + 0.25) / 8.0 - 0.5),
    ]
    for m1, lv1, m2, lv2, expected in cases:
        m1, lv2 = torch.tensor(m1, dtype=torch.float64), torch.tensor(lv2, dtype=torch.float64)
        got = normal_kl(m1, lv1, m2, lv2)
        assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)

    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 500, dtype=torch.float64, generator=g)
    lv1, lv2 = torch.randn(2, 500, dtype=torch.float64, generator=g) * 3
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m2, lv2).min().item() >= 0.0


def test_approx_cdf_error_is_about_1_8e_4():
    x = torch.linspace(-8, 8, 1_600_001, dtype=torch.float64)
    approx = approx_standard_normal_cdf(x)
    err = (approx - exact_cdf(x)).abs().max().item()
    assert 1.7e-4 < err < 2e-4  # the tanh approximation's maximum error, ~1.8e-4
    assert bool((approx[1:] >= approx[:-1]).all())  # monotone, so decoder bins never go negative
    assert approx[0].item() == pytest.approx(0.0, abs=1e-15) and approx[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("mean", [-1.0, -0.3, 0.0, 0.5, 0.999, 1.3])
@pytest.mark.parametrize("scale", [0.002, 2 / 255, 0.1, 1.0])
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, scale):
    means = torch.full_like(CENTRES, mean)
    log_scales = torch.full_like(CENTRES, math.log(scale))
    logp = discretized_gaussian_log_likelihood(CENTRES, means, log_scales)
    assert logp.shape == CENTRES.shape
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert logp.max().item() <= 0.0


def test_discretized_likelihood_bins_by_hand():
    scale, mean = 0.01, 0.1
    x = torch.tensor([[-1.0, 140 / 127.5 - 1, 1.0, -1.0]], dtype=torch.float64)
    means = torch.tensor([[-0.995, mean, 0.99, 1.0]], dtype=torch.float64)
    log_scales = torch.tensor([[math.log(scale)] * 3 + [math.log(0.001)]], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, means, log_scales)[0]
    hb = 1 / 255
    # left edge bin extends to -inf: only the upper CDF value
    assert logp[0].item() == pytest.approx(math.log(tanh_cdf((-1.0 + 0.995 + hb) / scale)), rel=1e-12)
    # interior bin: CDF(u+) - CDF(u-)
    c = x[0, 1].item() - mean
    interior = tanh_cdf((c + hb) / scale) - tanh_cdf((c - hb) / scale)
    assert logp[1].item() == pytest.approx(math.log(interior), rel=1e-12)
    exact = (exact_cdf(torch.tensor((c + hb) / scale)) - exact_cdf(torch.tensor((c - hb) / scale))).item()
    assert interior == pytest.approx(exact, abs=4e-4)
    # right edge bin extends to +inf
    assert logp[2].item() == pytest.approx(math.log(1 - tanh_cdf((1.0 - 0.99 - hb) / scale)), rel=1e-12)
    # a bin with no mass is floored at 1e-12
    assert logp[3].item() == pytest.approx(math.log(1e-12), rel=1e-12)
    # float32 rounding of an edge pixel still lands in the edge bin (the +-0.999 thresholds)
    edge32 = torch.tensor([[0 / 127.5 - 1.0]], dtype=torch.float32)
    lp = discretized_gaussian_log_likelihood(edge32, torch.full_like(edge32, -2.0), torch.zeros_like(edge32))
    assert lp.item() == pytest.approx(math.log(tanh_cdf(1.0 + hb)), rel=1e-5)


def test_mean_flat():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))


# ------------------------------------------------------------------ prior
def test_prior_bpd_linear_schedule_matches_spec():
    d = create_diffusion("linear", 1000, "fixed_large")
    abar_T = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert abar_T == pytest.approx(4.04e-5, rel=2e-3)
    x0 = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), -torch.ones(3, 2, 2),
                      torch.linspace(-1, 1, 12).reshape(3, 2, 2)]).double()
    prior = d.prior_bpd(x0)
    assert prior.shape == (4,)
    # independent: torch's own Normal KL, per dimension, averaged, in bits
    q = Normal(math.sqrt(abar_T) * x0, math.sqrt(1 - abar_T))
    ref = kl_divergence(q, Normal(torch.zeros_like(x0), torch.ones_like(x0))).flatten(1).mean(1) / LN2
    assert torch.allclose(prior, ref, rtol=1e-6, atol=1e-16)
    # 6e-10 bits/dim at x0 = 0 (= abar^2/4 nats to leading order), 2.9e-5 at |x0| = 1
    assert prior[0].item() == pytest.approx(abar_T**2 / 4 / LN2, rel=1e-3)
    assert prior[0].item() == pytest.approx(6e-10, rel=0.05)
    assert prior[1].item() == pytest.approx(2.9e-5, rel=0.01)
    assert prior[2].item() == pytest.approx(prior[1].item(), rel=1e-12)
    # float32 data: no catastrophic cancellation even at x0 = 0 (6e-4 relative error measured)
    assert torch.allclose(d.prior_bpd(x0.float()).double(), prior, rtol=2e-3, atol=0)


# ------------------------------------------------- the bound under an exact model
M, S = 0.1, 0.3  # data: N(M, S^2) quantized to 8 bits


def quantized_probs(m=M, s=S):
    """Exact P(bin k), k = 0..255, of round((x+1)*127.5) clipped to 0..255, x ~ N(m, s^2)."""
    k = torch.arange(256, dtype=torch.float64)
    lo = exact_cdf(((k - 0.5) / 127.5 - 1 - m) / s)
    hi = exact_cdf(((k + 0.5) / 127.5 - 1 - m) / s)
    lo[0], hi[-1] = 0.0, 1.0
    return hi - lo


def sample_quantized(n, generator, m=M, s=S):
    x = torch.randn(n, generator=generator, dtype=torch.float64) * s + m
    return torch.round((x + 1) * 127.5).clamp(0, 255).long()


def expected_terms(variance, probs, m=M, s=S):
    """E[term_t] in bits for t = 0..T-1 under the oracle (no clipping), from the schedule alone.

    The oracle's x0-prediction is linear in x_t: x0_hat = a x_t + b with a = sqrt(abar) s^2 / v,
    b = (1 - abar) m / v, v = abar s^2 + 1 - abar, so x0 - x0_hat = (1-abar)(x0-m)/v - a sqrt(1-abar) eps
    and E(x0 - x0_hat)^2 follows from the quantized data's moments. t >= 1 terms are Gaussian KLs whose
    only random part is that square; the t = 0 decoder term is integrated over eps on a grid.
    Also returns E(x0 - x0_hat)^2 per t, shape (T,).
    """
    betas = make_beta_schedule("linear", 1000)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    tilde = betas * (1 - abar_prev) / (1 - abar)
    # the t=1 clip (reference posterior_log_variance_clipped): log tilde-beta_1 = log 0 never appears
    tilde[0] = tilde[1]
    coef1 = abar_prev.sqrt() * betas / (1 - abar)
    sigma2 = torch.cat([tilde[1:2], betas[1:]]) if variance == "fixed_large" else tilde
    v = abar * s**2 + 1 - abar
    a = abar.sqrt() * s**2 / v
    b = (1 - abar) * m / v
    ex_m2 = (probs * (CENTRES - m) ** 2).sum()
    sq = (1 - abar) ** 2 * ex_m2 / v**2 + a**2 * (1 - abar)
    kl = 0.5 * (-1 + sigma2.log() - tilde.log() + tilde / sigma2 + coef1**2 * sq / sigma2) / LN2

    eps = torch.linspace(-9, 9, 20_001, dtype=torch.float64)
    w = torch.exp(-0.5 * eps**2)
    w = w / w.sum()
    x1 = abar[0].sqrt() * CENTRES[:, None] + (1 - abar[0]).sqrt() * eps[None, :]
    mean = a[0] * x1 + b[0]  # at t=1 the posterior mean is x0_hat itself (coef1 = 1, coef2 = 0)
    sd = sigma2[0].sqrt()
    up = approx_standard_normal_cdf((CENTRES[:, None] + 1 / 255 - mean) / sd)
    low = approx_standard_normal_cdf((CENTRES[:, None] - 1 / 255 - mean) / sd)
    mass = up - low
    mass[0], mass[-1] = up[0], 1 - low[-1]
    decoder = (probs * (-(mass.clamp(min=1e-12).log()) * w).sum(1)).sum() / LN2
    kl[0] = decoder
    prior = 0.5 * (-1 - (1 - abar[-1]).log() + (1 - abar[-1]) + abar[-1] * (probs * CENTRES**2).sum()) / LN2
    return kl, prior, sq


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_single_terms_match_their_expectation(variance):
    """Each vb term, averaged over many (x0, eps), equals its closed-form expectation (5 standard errors)."""
    d = create_diffusion("linear", 1000, variance)
    probs = quantized_probs()
    expected, _, _ = expected_terms(variance, probs)
    g = torch.Generator().manual_seed(7)
    n = 20_000
    x0 = CENTRES[sample_quantized(n, g)].float().view(n, 1)
    model = gaussian_eps_oracle(d, M, S)
    for i in (0, 1, 2, 10, 100, 500, 999):
        t = torch.full((n,), i, dtype=torch.long)
        x_t = d.q_sample(x0, t, generator=g)
        out = d.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)
        assert out["output"].shape == (n,) and out["pred_x0"].shape == x0.shape
        se = out["output"].double().std().item() / math.sqrt(n)
        assert out["output"].double().mean().item() == pytest.approx(expected[i].item(), abs=5 * se + 1e-7), i


def test_mixed_timesteps_select_decoder_or_kl_per_example():
    d = create_diffusion("linear", 1000, "fixed_large")
    g = torch.Generator().manual_seed(0)
    x0 = CENTRES[torch.randint(0, 256, (4, 3, 2, 2), generator=g)].float()
    x_t = torch.randn(4, 3, 2, 2, generator=g) * 0.1 + x0
    t = torch.tensor([0, 5, 0, 700])
    model = gaussian_eps_oracle(d, 0.0, 0.5)
    mixed = d.vb_terms_bpd(model, x0, x_t, t)["output"]
    for j in range(4):
        alone = d.vb_terms_bpd(model, x0[j:j + 1], x_t[j:j + 1], t[j:j + 1])["output"]
        assert mixed[j].item() == pytest.approx(alone.item(), rel=1e-6)
    # the t=0 entries are the decoder NLL by hand; the others the KL by hand
    p = d.p_mean_variance(model, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean((1, 2, 3)) / LN2
    qm, _, qlv = d.q_posterior_mean_variance(x0, x_t, t)
    kl = normal_kl(qm, qlv, p["mean"], p["log_variance"]).flatten(1).mean(1) / LN2
    assert torch.allclose(mixed, torch.where(t == 0, nll, kl))
    assert mixed[0].item() != pytest.approx(kl[0].item())


@pytest.mark.parametrize("variance,margin", [("fixed_large", 0.3), ("fixed_small", 1.0)])
def test_bound_with_exact_predictor_sits_just_above_the_data_entropy(variance, margin):
    """THE KEY TEST: the bound of the Bayes-optimal eps-model is an upper bound on the entropy of 8-bit data.

    Data: N(0.1, 0.3^2) quantized to 8 bits (entropy 7.2970 bits, exact). The Monte Carlo total must
    (a) agree with its closed-form expectation, (b) not fall below the entropy, (c) stay within
    ``margin`` above it. Expectations: fixed_large 7.4256 (0.129 above the entropy), fixed_small 8.0630
    (0.766 above). Measured (N=2000, float32, seed 0): 7.334 +- 0.048 and 7.932 +- 0.055 (seeds 0-7:
    0.04-0.19 and 0.63-0.82 above). fixed_small's larger gap is the model, not MC error: at small t the
    optimal reverse variance for near-continuous data is close to beta_t, and tilde-beta_t =
    beta_t (1 - abar_{t-1}) / (1 - abar_t) is up to ~2x smaller; 0.5 (r - 1 - log r) summed over t
    costs ~0.6 bits (Ho et al. §3.2: beta_t and tilde-beta_t are the two extremes).
    """
    d = create_diffusion("linear", 1000, variance)
    probs = quantized_probs()
    entropy = -(probs * probs.log2()).sum().item()
    assert entropy == pytest.approx(7.2970, abs=1e-4)
    expected, prior, sq = expected_terms(variance, probs)
    expected_total = expected.sum().item() + prior.item()
    assert entropy < expected_total < entropy + margin  # the bound holds in expectation, no MC noise

    g = torch.Generator().manual_seed(0)
    n = 2000
    x0 = CENTRES[sample_quantized(n, g)].float().view(n, 1)
    out = d.bits_per_dim(gaussian_eps_oracle(d, M, S), x0, generator=g, clip_denoised=False)
    total = out["total"].double()
    mean, se = total.mean().item(), total.std().item() / math.sqrt(n)
    print(f"\n{variance}: bound {mean:.4f} +- {se:.4f} bits/dim (expectation {expected_total:.4f}), "
          f"entropy {entropy:.4f}, gap {mean - entropy:.4f} "
          f"(decoder {out['terms'][:, 0].mean():.4f}, KL terms {out['terms'][:, 1:].sum(1).mean():.4f})")
    assert mean == pytest.approx(expected_total, abs=4 * se)
    assert mean > entropy - 4 * se
    assert mean < entropy + margin
    # the prior is linear in x0^2, so its sample mean follows from the sample's mean square (float32 data)
    abar_T = torch.cumprod(1 - make_beta_schedule("linear", 1000), 0)[-1]
    prior_here = 0.5 * (-(1 - abar_T).log() - abar_T + abar_T * x0.double().pow(2).mean()) / LN2
    assert out["prior"].double().mean().item() == pytest.approx(prior_here.item(), rel=1e-4)
    assert prior_here.item() == pytest.approx(prior.item(), rel=0.05)
    # pred-x0 MSE: per-t averages against E(x0 - x0_hat)^2, summed over blocks of t to average the noise
    mse = out["mse"].double().mean(0)
    for lo, hi in ((0, 10), (10, 100), (100, 1000)):
        assert mse[lo:hi].sum().item() == pytest.approx(sq[lo:hi].sum().item(), rel=0.05)
    # x0 - x0_hat = sqrt((1-abar)/abar) (eps_hat - eps), so the two MSEs differ by a known factor
    abar = d.alphas_cumprod.float()
    assert torch.allclose(out["eps_mse"], out["mse"] * abar / (1 - abar), rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------ API
def test_bits_per_dim_shapes_keys_determinism_and_indexing():
    num = 50
    d = create_diffusion("linear", num, "fixed_large")
    g = torch.Generator().manual_seed(0)
    x0 = CENTRES[torch.randint(0, 256, (3, 2, 4, 4), generator=g)].float()
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return 0.5 * x

    out = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(5))
    assert set(out) == {"total", "prior", "terms", "mse", "eps_mse"}
    assert out["total"].shape == out["prior"].shape == (3,)
    assert out["terms"].shape == out["mse"].shape == out["eps_mse"].shape == (3, num)
    assert torch.allclose(out["total"], out["terms"].sum(1) + out["prior"])
    assert not out["total"].requires_grad
    # the model sees LongTensor (B,) 0-based indices, from T-1 down to 0
    assert [s.dtype for s in seen] == [torch.long] * num and all(s.shape == (3,) for s in seen)
    assert [int(s[0]) for s in seen] == list(range(num - 1, -1, -1))

    again = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(5), progress=True)
    for k in out:
        assert torch.equal(out[k], again[k]), k
    other = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(out["terms"], other["terms"])
    assert torch.equal(out["prior"], other["prior"])

    # replay the noise stream: draws come in the order t = T-1, ..., 0, so column t uses draw T-1-t
    noise = torch.randn(num, *x0.shape, generator=torch.Generator().manual_seed(5))
    for i in (0, 1, num - 1):
        t = torch.full((3,), i, dtype=torch.long)
        x_t = d.q_sample(x0, t, noise[num - 1 - i])
        p = d.p_mean_variance(model, x_t, t, clip_denoised=True)
        if i == 0:  # column 0 is the decoder NLL
            ref = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        else:
            qm, _, qlv = d.q_posterior_mean_variance(x0, x_t, t)
            ref = normal_kl(qm, qlv, p["mean"], p["log_variance"])
        assert torch.allclose(out["terms"][:, i], ref.flatten(1).mean(1) / LN2, rtol=1e-5, atol=1e-7), i
        assert torch.allclose(out["mse"][:, i], (p["pred_x0"] - x0).pow(2).flatten(1).mean(1), rtol=1e-5)
        # eps recomputed from the clipped x0, as calc_bpd_loop (equal to the output 0.5 x_t where nothing clips)
        eps_err = (d.predict_eps_from_x0(x_t, t, p["pred_x0"]) - noise[num - 1 - i]).pow(2).flatten(1).mean(1)
        assert torch.allclose(out["eps_mse"][:, i], eps_err, rtol=1e-5)

    # clip_denoised defaults to True: this model's x0 predictions leave [-1, 1] at large t
    unclipped = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(5), clip_denoised=False)
    assert not torch.equal(out["terms"][:, -1], unclipped["terms"][:, -1])
    assert out["mse"].max().item() <= 4.0 + 1e-6
    # without a generator the global RNG is used
    assert d.bits_per_dim(model, x0)["total"].shape == (3,)


def test_eps_mse_comes_from_the_clipped_x0_as_calc_bpd_loop():
    """improved-diffusion's calc_bpd_loop takes eps = _predict_eps_from_xstart(x_t, t, pred_xstart), the x0 clipped
    to [-1, 1]: for an eps-model whose x0 leaves [-1, 1] that differs from the network's own eps."""
    num = 50
    d = create_diffusion("linear", num, "fixed_large")
    x0 = CENTRES[torch.randint(0, 256, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0))].float()

    def model(x, t):  # eps = -2: x0 = (x_t + 2 sqrt(1 - abar)) / sqrt(abar), far above 1 at large t
        return torch.full_like(x, -2.0)

    out = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(1))
    # column t used draw T-1-t (one stream: x0 has a multiple of 16 elements, where torch draws alike in bulk)
    noise = torch.randn(num, *x0.shape, generator=torch.Generator().manual_seed(1))
    clipped_somewhere = False
    for i in range(num):
        t = torch.full((4,), i, dtype=torch.long)
        x_t = d.q_sample(x0, t, noise[num - 1 - i])
        pred_x0 = d.predict_x0_from_eps(x_t, t, model(x_t, t))
        clipped = pred_x0.clamp(-1, 1)
        reference = mean_flat((d.predict_eps_from_x0(x_t, t, clipped) - noise[num - 1 - i]) ** 2)
        own_eps = mean_flat((model(x_t, t) - noise[num - 1 - i]) ** 2)
        assert torch.allclose(out["eps_mse"][:, i], reference, rtol=1e-5, atol=1e-6), i
        if not torch.equal(clipped, pred_x0):
            clipped_somewhere = True
            assert not torch.allclose(out["eps_mse"][:, i], own_eps, rtol=1e-3), i
    assert clipped_somewhere
    # without clipping the two agree: eps from the unclipped x0 is the output again, up to rounding
    unclipped = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    own = torch.stack([mean_flat((-2.0 - noise[num - 1 - i]) ** 2) for i in range(num)], dim=1)
    assert torch.allclose(unclipped["eps_mse"][:, 1:], own[:, 1:], rtol=1e-4)
