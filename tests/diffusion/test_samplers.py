"""Respacing and the DDPM/DDIM samplers against closed forms and against each other."""

import logging
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.diffusion import GaussianDiffusion, create_diffusion, make_beta_schedule
from src.diffusion.gaussian_diffusion import randn
from src.diffusion.samplers import (
    DDIM,
    Ancestral,
    RespacedModel,
    ddim_sample,
    ddpm_sample,
    resolve_timesteps,
    respace,
    space_timesteps,
)
from tests.helpers import CONFIG_DIR
from tests.helpers.oracles import gaussian_eps_oracle


def linear_model(shape, num_timesteps, seed=0):
    """A fixed random affine function of x_t and t: nontrivial, deterministic, cheap."""
    g = torch.Generator().manual_seed(seed)
    dim = math.prod(shape[1:])
    a = torch.randn(dim, dim, generator=g) * (0.5 / math.sqrt(dim))
    b = torch.randn(dim, generator=g)

    def model(x, t):
        flat = x.flatten(1)
        return (flat @ a + 0.5 * flat + (t.to(x.dtype) / num_timesteps)[:, None] * b).view_as(x)

    return model


# ------------------------------------------------------------------ space_timesteps
def test_space_timesteps_matches_improved_ddpm_examples():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    t = space_timesteps(4000, "50")
    assert len(t) == 50 and t[:4] == [0, 82, 163, 245] and t[-3:] == [3836, 3917, 3999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, [10]) == space_timesteps(1000, "10") == space_timesteps(1000, 10)
    assert space_timesteps(100, 100) == list(range(100))
    # sections: [0,100) keeps 10, [100,200) keeps 15, [200,300) keeps 20, each with both ends
    t = space_timesteps(300, "10,15,20")
    assert len(t) == 45
    assert [sum(lo <= i < lo + 100 for i in t) for lo in (0, 100, 200)] == [10, 15, 20]
    assert {0, 99, 100, 199, 200, 299} <= set(t)


@pytest.mark.parametrize("bad", ["ddim700", "1001", "0", "ddimx", "ten", "600,600"])
def test_space_timesteps_rejects_impossible_requests(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


@pytest.mark.parametrize("steps", [0, 101, -3])
def test_step_counts_outside_1_to_T_raise(steps):
    d = create_diffusion("linear", 100)
    model = linear_model((1, 2), 100)
    with pytest.raises(ValueError, match="out of range"):
        ddpm_sample(d, model, (1, 2), steps=steps)
    with pytest.raises(ValueError, match="out of range"):
        ddim_sample(d, model, (1, 2), steps=steps)


# ------------------------------------------------------------------ respacing
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_alpha_bar_equals_original_at_kept_indices(schedule):
    d = create_diffusion(schedule, 1000, "fixed_small")
    kept = space_timesteps(1000, "10,20,5")
    spaced, timestep_map = respace(d, kept)
    assert timestep_map.dtype == torch.long and timestep_map.tolist() == kept
    assert spaced.num_timesteps == len(kept) and spaced.variance == "fixed_small"
    # closed form: the cumprod of the new alphas is the original alpha-bar at the kept indices
    # (float64 exact: 1 - (1 - r) loses only ~1e-16 absolute where the cosine alpha-bar nears 0)
    new_abar = torch.cumprod(1 - spaced.betas, 0)
    assert torch.allclose(new_abar, d.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    assert torch.allclose(spaced.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    # the new beta of the first kept index is the original 1 - abar (abar_prev starts at 1)
    assert spaced.betas[0].item() == pytest.approx(1 - d.alphas_cumprod[kept[0]].item(), rel=1e-12)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_keeping_every_step_reproduces_the_original_process(variance):
    d = GaussianDiffusion(make_beta_schedule("cosine", 200), variance)
    spaced, timestep_map = respace(d, range(200))
    assert torch.equal(timestep_map, torch.arange(200))
    for name, value in d.buffers.items():
        assert torch.allclose(spaced.buffers[name], value, rtol=1e-9, atol=1e-12), name


def test_respaced_model_sees_original_indices():
    d = create_diffusion("linear", 100)
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        assert (t == t[0]).all()
        return torch.zeros_like(x)

    ddpm_sample(d, model, (2, 3), steps="10", generator=torch.Generator().manual_seed(0))
    assert seen == sorted(space_timesteps(100, "10"), reverse=True)
    assert RespacedModel(model, torch.tensor([4, 7]))(torch.zeros(1, 3), torch.tensor([1])).shape == (1, 3)
    assert seen[-1] == 7


def test_ddim_default_spacing_is_the_ddim_stride():
    d = create_diffusion("linear", 100)
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    ddim_sample(d, model, (1, 2), steps=10)
    assert seen == list(range(90, -1, -10))
    seen.clear()
    ddim_sample(d, model, (1, 2), steps=None, timesteps=[3, 50, 99])
    assert seen == [99, 50, 3]
    assert resolve_timesteps(100, None) == list(range(100))


# ------------------------------------------------------------------ samplers
@pytest.mark.parametrize("steps", [None, "25", "10,5"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_eta_1_is_ancestral_sampling_with_fixed_small(steps, clip):
    """eta = 1 gives sigma^2 = tilde-beta of the (respaced) chain and the posterior mean: DDPM, fixed_small.

    Both samplers draw x_T and then one noise tensor per step from the same generator, so the chains agree
    sample by sample.
    """
    T, shape = 100, (6, 2, 3, 3)
    d = create_diffusion("linear", T, "fixed_small")
    model = linear_model(shape, T)
    kept = resolve_timesteps(T, steps)
    ancestral = ddpm_sample(d, model, shape, steps=steps, generator=torch.Generator().manual_seed(7),
                            clip_denoised=clip)
    ddim = ddim_sample(d, model, shape, eta=1.0, timesteps=kept, generator=torch.Generator().manual_seed(7),
                       clip_denoised=clip)
    assert ancestral.abs().max() > 0.1 and torch.isfinite(ancestral).all()
    torch.testing.assert_close(ddim, ancestral, rtol=1e-4, atol=1e-4)
    # and it is not DDPM with the larger variance
    large = create_diffusion("linear", T, "fixed_large")
    other = ddpm_sample(large, model, shape, steps=steps, generator=torch.Generator().manual_seed(7),
                        clip_denoised=clip)
    assert not torch.allclose(other, ancestral, atol=1e-3)


def test_full_ddpm_sample_is_the_diffusion_sample():
    d = create_diffusion("linear", 50, "fixed_large")
    model = linear_model((3, 4), 50)
    a = ddpm_sample(d, model, (3, 4), generator=torch.Generator().manual_seed(1))
    b = d.sample(model, (3, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_ddim_eta_0_is_deterministic_given_x_T():
    T, shape = 100, (4, 1, 4, 4)
    d = create_diffusion("linear", T)
    model = linear_model(shape, T, seed=3)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(d, model, shape, steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(d, model, shape, steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim_sample(d, model, shape, steps=20, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(1))
    e = ddim_sample(d, model, shape, steps=20, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)
    # a seeded generator alone reproduces a run
    f = ddim_sample(d, model, shape, steps=20, eta=0.5, generator=torch.Generator().manual_seed(5))
    g = ddim_sample(d, model, shape, steps=20, eta=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(f, g)


def exact_chain_moments(abar, kept, m, s, kind):
    """Mean and std of x_0 from the chain run with the exact oracle: every step is affine in x_t, so
    (mean, var) propagate in closed form (the posterior, eq. 7, for DDPM; Song et al. eq. 12 with eta = 0 for DDIM)."""
    mean, var = 0.0, 1.0
    order = list(reversed(kept))
    for n, i in enumerate(order):
        a = abar[i].item()
        ap = abar[order[n + 1]].item() if n + 1 < len(order) else 1.0
        c = math.sqrt(1 - a) / (a * s**2 + 1 - a)  # eps = c (x - sqrt(a) m)
        x0_slope, x0_icpt = (1 - math.sqrt(1 - a) * c) / math.sqrt(a), math.sqrt(1 - a) * c * m
        if kind == "ddim":
            slope = math.sqrt(ap) * x0_slope + math.sqrt(1 - ap) * c
            icpt = math.sqrt(ap) * x0_icpt - math.sqrt(1 - ap) * c * math.sqrt(a) * m
            noise_var = 0.0
        else:
            beta = 1 - a / ap
            c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            slope, icpt = c1 * x0_slope + c2, c1 * x0_icpt
            tilde_beta = beta * (1 - ap) / (1 - a)
            noise_var = 0.0 if n + 1 == len(order) else (beta if kind == "fixed_large" else tilde_beta)
        mean, var = slope * mean + icpt, slope**2 * var + noise_var
    return mean, math.sqrt(var)


@pytest.mark.parametrize("sampler", ["ddim50", "ddpm100_fixed_small", "ddpm100_fixed_large"])
def test_short_chains_with_exact_predictor_recover_the_data_distribution(sampler):
    """Gaussian data x0 ~ N(m, s^2) and its exact epsilon: the samples follow the chain's closed-form moments
    (a sharp check of the implementation), and those are within a few percent of (m, s) (discretization)."""
    m, s, n = 0.3, 0.5, 20_000
    variance = "fixed_large" if sampler.endswith("large") else "fixed_small"
    d = create_diffusion("linear", 1000, variance)
    model = gaussian_eps_oracle(d, m, s)
    g = torch.Generator().manual_seed(1)
    if sampler == "ddim50":
        x = ddim_sample(d, model, (n, 1), steps=50, eta=0.0, generator=g, clip_denoised=False)
        mean, std = exact_chain_moments(d.alphas_cumprod, list(range(0, 1000, 20)), m, s, "ddim")
        rel = 0.06  # 50 Euler steps of the DDIM ODE shrink the std by 5.5%
    else:
        x = ddpm_sample(d, model, (n, 1), steps=100, generator=g, clip_denoised=False)
        mean, std = exact_chain_moments(d.alphas_cumprod, space_timesteps(1000, "100"), m, s, variance)
        # the lower-bound variance (tilde-beta) loses 7% of the std at 100 steps
        rel = 0.08 if variance == "fixed_small" else 0.02
    # sampling error: mean +-3.5e-3, std +-0.5% (1 sigma at n = 20k)
    assert x.mean().item() == pytest.approx(mean, abs=0.012)
    assert x.std().item() == pytest.approx(std, rel=0.02)
    assert mean == pytest.approx(m, abs=0.01)
    assert std == pytest.approx(s, rel=rel)


def test_seeded_noise_is_the_cpu_generators_on_every_device():
    from src.diffusion.gaussian_diffusion import randn

    want = torch.randn((3, 4), generator=torch.Generator().manual_seed(7))
    assert torch.equal(randn((3, 4), torch.Generator().manual_seed(7), "cpu"), want)
    if torch.cuda.is_available():  # pinned, non-blocking copy on CUDA: the same values, no stream sync
        got = randn((3, 4), torch.Generator().manual_seed(7), "cuda")
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want)


# ------------------------------------------------------------------ progress in log files
@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_respaced", "ddim"])
def test_sampling_progress_is_log_lines_when_stderr_is_not_a_terminal(sampler, capfd, caplog, monkeypatch):
    # capfd: stdout and stderr are files here, as in `python -m src.sample > log 2>&1` or a SLURM log
    monkeypatch.delenv("DDPM_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="src.utils.progress")
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    model = linear_model((2, 3), 40)
    run = {"ddpm": lambda: ddpm_sample(d, model, (2, 3), progress=True),
           "ddpm_respaced": lambda: ddpm_sample(d, model, (2, 3), steps=10, progress=True),
           "ddim": lambda: ddim_sample(d, model, (2, 3), steps=10, progress=True)}[sampler]
    run()
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "\x1b[" not in out + err
    lines = [r.getMessage() for r in caplog.records if r.name == "src.utils.progress"]
    steps = 40 if sampler == "ddpm" else 10
    assert lines and "done in" in lines[-1] and f"{steps}/{steps}" in lines[-1] and "steps/s" in lines[-1]
    assert len(lines) <= 11  # at most one per tenth (or 30 s) and the final one, not one per step


# ------------------------------------------------------------------ sampler objects (configs/sampler/*.yaml)
def test_sampler_configs_instantiate_the_classes():
    ddpm = instantiate(OmegaConf.load(f"{CONFIG_DIR}/sampler/ddpm.yaml"))
    ddim = instantiate(OmegaConf.load(f"{CONFIG_DIR}/sampler/ddim.yaml"))
    assert ddpm == Ancestral(steps=None) and ddim == DDIM(steps=50, eta=0.0)
    # a list means section counts, as the string does
    assert instantiate(OmegaConf.create({"_target_": "src.diffusion.samplers.Ancestral", "steps": [3, 4]})).steps \
        == "3,4"
    assert repr(ddim) == "DDIM(steps=50, eta=0.0, spacing=None, threshold=None, threshold_max=None)"  # logged


@pytest.mark.parametrize(("sampler", "function", "kwargs"), [
    (Ancestral(), ddpm_sample, {}),
    (Ancestral(steps="10"), ddpm_sample, {"steps": "10"}),
    (Ancestral(steps=[3, 4]), ddpm_sample, {"steps": "3,4"}),
    (DDIM(steps=7), ddim_sample, {"steps": 7}),
    (DDIM(steps="10,5", eta=0.5), ddim_sample, {"steps": "10,5", "eta": 0.5}),
], ids=["ancestral", "respaced", "sections", "ddim", "ddim-eta"])
@pytest.mark.parametrize("clip", [True, False])
def test_sampler_objects_are_bit_identical_to_the_functions(sampler, function, kwargs, clip):
    """x_T drawn from the generator by the caller, then the object: the same stream as the function drawing x_T."""
    T, shape = 40, (4, 2, 3)
    d = create_diffusion("linear", T, "fixed_small")
    model = linear_model(shape, T, seed=2)
    g = torch.Generator().manual_seed(11)
    new = sampler(model, d, randn(shape, generator=g), generator=g, clip_denoised=clip)
    old = function(d, model, shape, generator=torch.Generator().manual_seed(11), clip_denoised=clip, **kwargs)
    assert new.abs().max() > 0.1 and torch.equal(new, old)


def test_sampler_objects_follow_x_T_in_shape_device_and_dtype():
    d = create_diffusion("linear", 40)
    model = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.randn(3, 5, dtype=torch.float64)
    for sampler in (Ancestral(steps=4), DDIM(steps=4, eta=1.0)):
        out = sampler(model, d, x_T, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 5) and out.dtype == torch.float64 and out.device == x_T.device


@pytest.mark.parametrize(("sampler", "message"), [
    (Ancestral(steps=41), r"sampler.steps=41 does not fit this checkpoint \(T=40\): steps=41 is out of range"),
    (Ancestral(steps="ddim9"), r"sampler.steps='ddim9' does not fit this checkpoint \(T=40\)"),
    (Ancestral(steps=1), "sampler.steps=1 keeps 1 step; ancestral sampling needs at least 2 "
                         r"\(use sampler=ddim for a single step\)"),
    (DDIM(steps=0), "sampler.steps=0 does not fit this checkpoint .*out of range"),
    (DDIM(steps=5, eta=-0.5), r"sampler.eta must be >= 0 \(0: deterministic DDIM, 1: DDPM-like noise\), got -0.5"),
    (DDIM(steps=5, eta=float("nan")), "sampler.eta must be >= 0"),
], ids=["steps>T", "no-stride", "ancestral-1-step", "ddim-0-steps", "eta<0", "eta-nan"])
def test_sampler_settings_are_checked_against_the_diffusion(sampler, message):
    d = create_diffusion("linear", 40)
    with pytest.raises(ValueError, match=message):
        sampler.check(d)
    with pytest.raises(ValueError, match=message):  # and when called directly
        sampler(linear_model((1, 2), 40), d, torch.zeros(1, 2))


def test_a_mean_predicting_model_cannot_be_respaced_but_samples_all_steps_or_with_ddim():
    d = create_diffusion("linear", 40, parameterization="mean")
    with pytest.raises(ValueError, match=r"mean-predicting model .*sampler.steps=null.*sampler=ddim"):
        Ancestral(steps=5).check(d)
    Ancestral().check(d)
    DDIM(steps=5).check(d)
