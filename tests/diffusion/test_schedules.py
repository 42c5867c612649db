import math

import pytest
import torch

from src.diffusion import SCHEDULES, create_diffusion, make_beta_schedule


def test_linear_endpoints_and_alpha_bar():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    # closed form of the product, step by step in Python floats
    abar = 1.0
    for i in range(1000):
        abar *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert torch.cumprod(1 - betas, 0)[-1].item() == pytest.approx(abar, rel=1e-10)
    assert abar == pytest.approx(4.04e-5, rel=2e-3)  # Ho et al. 2020 §4: L_T ~ 1e-5 bits/dim


def test_linear_rescales_for_other_T():
    betas = make_beta_schedule("linear", 4000)
    assert betas[0].item() == pytest.approx(2.5e-5)
    assert betas[-1].item() == pytest.approx(0.005)
    assert torch.cumprod(1 - betas, 0)[-1].item() == pytest.approx(4.25e-5, rel=5e-3)


def test_cosine_matches_alpha_bar_formula():
    T, s = 1000, 0.008
    betas = make_beta_schedule("cosine", T)

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    abar = torch.cumprod(1 - betas, 0)
    for t in (1, 10, 500, 999):  # before the cap binds
        assert abar[t - 1].item() == pytest.approx(f(t / T) / f(0), rel=1e-9)
    assert betas[-1].item() == 0.999  # only the final beta is capped
    assert (betas[:-1] < 0.999).all()
    assert betas[0].item() == pytest.approx(4.13e-5, rel=5e-3)


def test_quadratic_and_sigmoid_shapes():
    q = make_beta_schedule("quadratic", 1000)
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    mid = (math.sqrt(1e-4) + (math.sqrt(0.02) - math.sqrt(1e-4)) * 500 / 999) ** 2
    assert q[500].item() == pytest.approx(mid, rel=1e-12)
    sg = make_beta_schedule("sigmoid", 1000)
    assert (sg.diff() > 0).all()
    expected_first = 1e-4 + (0.02 - 1e-4) / (1 + math.exp(6))
    assert sg[0].item() == pytest.approx(expected_first, rel=1e-12)


def test_constant_and_warmup():
    assert torch.allclose(make_beta_schedule("constant", 1000), torch.full((1000,), 0.02, dtype=torch.float64))
    w = make_beta_schedule("warmup10", 1000)
    assert w[0].item() == pytest.approx(1e-4) and w[99].item() == pytest.approx(0.02) and (w[100:] == 0.02).all()


def test_small_T_linear_points_to_the_fix():
    with pytest.raises(ValueError, match="beta_end"):
        make_beta_schedule("linear", 10)
    assert make_beta_schedule("linear", 10, beta_end=0.5)[-1].item() == 0.5


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_valid(name):
    betas = make_beta_schedule(name, 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert ((betas > 0) & (betas <= 1)).all()


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="valid names are linear, cosine, quadratic, sigmoid"):
        make_beta_schedule("cosinus", 1000)


def test_bad_timesteps():
    with pytest.raises(ValueError, match="num_timesteps"):
        make_beta_schedule("linear", 0)


@pytest.mark.parametrize(("value", "message"), [
    (1.5, r"diffusion.num_timesteps must be an integer .*got 1.5"),
    ("abc", r"diffusion.num_timesteps must be an integer .*got 'abc'"),
    (True, r"diffusion.num_timesteps must be an integer .*got True"),
    (float("inf"), r"diffusion.num_timesteps must be an integer .*got inf"),
    (1, r"diffusion.num_timesteps must be >= 2, got 1: .*step 2's variance"),
    (0, r"diffusion.num_timesteps must be >= 2, got 0"),
    (-5, r"diffusion.num_timesteps must be >= 2, got -5"),
])
def test_create_diffusion_refuses_timesteps_that_are_not_an_integer_of_at_least_2(value, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion("cosine", value)


def test_create_diffusion_takes_integral_floats_and_two_steps():
    assert create_diffusion("cosine", 20.0).num_timesteps == 20
    assert create_diffusion("cosine", 2).num_timesteps == 2


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "abc", None, True])
def test_create_diffusion_refuses_hybrid_weights_that_are_not_finite_and_non_negative(value):
    with pytest.raises(ValueError, match=rf"diffusion.hybrid_weight must be a finite number >= 0 .*got {value!r}"):
        create_diffusion("cosine", 20, variance="learned_range", objective="hybrid", hybrid_weight=value)
