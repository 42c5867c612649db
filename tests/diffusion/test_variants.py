"""Parameterizations and objectives are objects chosen by ``_target_``: a new one is a class (here, in this file)
and a config node, with nothing changed in src/; the old names of checkpoints before the change still load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.diffusion import (
    OBJECTIVES,
    PARAMETERIZATIONS,
    Eps,
    GaussianDiffusion,
    Hybrid,
    Simple,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    make_beta_schedule,
)
from src.diffusion.legacy import canonical_diffusion_config
from src.diffusion.losses import mean_flat
from src.diffusion.objectives import Objective, mse_term
from src.diffusion.parameterizations import Parameterization
from src.train import train
from src.utils.checkpoint import load_module

HERE = __name__  # tests.diffusion.test_variants: the module path a config's _target_ names


@dataclass(frozen=True)
class TwiceX0(Parameterization):
    """Predicts 2 x0 (a parameterization src/ has never heard of)."""

    name: ClassVar[str] = "twice_x0"

    def target(self, diffusion, x0, x_t, t, noise):
        return 2.0 * x0

    def to_x0(self, diffusion, output, x_t, t):
        return output / 2.0


@dataclass(frozen=True)
class MinSnr(Simple):
    """L_simple weighted per example by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t) (min-SNR weighting,
    Hang et al. 2023); a subclass of Simple, so it keeps Simple's refusal of a learned variance."""

    name: ClassVar[str] = "min_snr"
    logged_terms: ClassVar[tuple[str, ...]] = ("mse",)

    gamma: float = 5.0

    def __call__(self, diffusion, model_output, x0, x_t, t, noise):
        abar = diffusion.extract("alphas_cumprod", t, x0).flatten()
        snr = abar / (1.0 - abar)
        mse = mse_term(diffusion, model_output, x0, x_t, t, noise)
        return {"loss": snr.clamp(max=self.gamma) / snr * mse, "mse": mse}


def new_variant_node(**diffusion) -> dict:
    return {"_target_": "src.diffusion.create_diffusion", "schedule": "linear", "num_timesteps": 50,
            "parameterization": {"_target_": f"{HERE}.TwiceX0"},
            "objective": {"_target_": f"{HERE}.MinSnr", "gamma": 2.0}, **diffusion}


def test_a_parameterization_and_an_objective_defined_here_build_from_a_config_node():
    d = instantiate(OmegaConf.create(new_variant_node()))
    assert isinstance(d.parameterization, TwiceX0) and d.objective == MinSnr(gamma=2.0)

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 1.6 - 0.8
    noise = torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 9, 20, 35, 49])
    x_t = d.q_sample(x0, t, noise)
    # the exact output recovers x0, eps and the posterior mean, and has no loss

    def exact(x, tt):
        return 2.0 * x0

    out = d.p_mean_variance(exact, x_t, t, clip_denoised=False)
    assert torch.allclose(out["pred_x0"], x0, atol=1e-6)
    assert torch.allclose(out["pred_eps"][1:], noise[1:], atol=1e-3)
    assert torch.allclose(out["mean"], d.q_posterior_mean_variance(x0, x_t, t)[0], atol=1e-5)
    assert torch.equal(d.training_losses(exact, x0, t, noise), torch.zeros(6))

    # the objective: per-example weights on the MSE to 2 x0, with a gradient
    output = torch.randn(6, 1, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt: output, x0, t, noise, return_terms=True)
    abar = d.alphas_cumprod[t]
    weight = (torch.minimum(abar / (1 - abar), torch.tensor(2.0, dtype=torch.float64)) / (abar / (1 - abar))).float()
    assert torch.allclose(terms["mse"], mean_flat((2.0 * x0 - output) ** 2))
    assert torch.allclose(terms["loss"], weight * terms["mse"], rtol=1e-3)  # SNR in float32 here
    assert weight[0] < 1.0 and weight[-1] == 1.0  # low noise (high SNR) is down-weighted
    terms["loss"].sum().backward()
    assert output.grad.abs().sum() > 0

    # the compatibility rule came with the subclass
    with pytest.raises(Exception, match="learned_range with diffusion.objective=min_snr: the MSE gives"):
        instantiate(OmegaConf.create(new_variant_node(variance="learned_range")))


def test_the_new_variants_train_checkpoint_reload_and_sample_through_the_entry_point(tmp_path, one_thread):
    from tests.helpers import TINY, compose_config

    run = tmp_path / "run"
    cfg = compose_config([*TINY, "trainer.max_steps=2", "callbacks.sample_grid=null",
                          f"diffusion.parameterization._target_={HERE}.TwiceX0",
                          f"diffusion.objective._target_={HERE}.MinSnr", "+diffusion.objective.gamma=2.0"], run)
    train(cfg)
    module = load_module(run / "checkpoints" / "last.ckpt")
    d, net = module.diffusion, module.net
    assert isinstance(d.parameterization, TwiceX0) and d.objective == MinSnr(gamma=2.0)
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/mse_step" in metrics  # the objective's logged_terms
    shape = (2, *module.data_shape)
    for samples in (ddpm_sample(d, net, shape, generator=torch.Generator().manual_seed(0)),
                    ddpm_sample(d, net, shape, steps=5, generator=torch.Generator().manual_seed(0)),
                    ddim_sample(d, net, shape, steps=5, generator=torch.Generator().manual_seed(0))):
        assert samples.shape == shape and torch.isfinite(samples).all()


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_old_parameterization_names_give_the_objects_of_the_group_configs(name, compose_cfg):
    old = create_diffusion("linear", 50, parameterization=name)
    new = instantiate(compose_cfg(f"diffusion/parameterization={name}").diffusion)
    assert old.parameterization == new.parameterization and old.parameterization.name == name


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_old_objective_names_give_the_objects_of_the_group_configs(name, compose_cfg):
    variance = "fixed_large" if name == "simple" else "learned_range"
    old = create_diffusion("linear", 50, variance, objective=name, hybrid_weight=0.01)
    cfg = compose_cfg(f"diffusion/objective={name}", f"diffusion/variance={variance}", "diffusion.hybrid_weight=0.01")
    assert old.objective == instantiate(cfg.diffusion).objective and old.objective.name == name
    # an old config node (names) and the new one (objects) are the same once written canonically
    old_node = {**OmegaConf.to_container(cfg.diffusion, resolve=True), "parameterization": "eps", "objective": name}
    assert canonical_diffusion_config(old_node) == OmegaConf.to_container(cfg.diffusion, resolve=True)


def test_hybrid_weight_of_an_old_config_reaches_the_object():
    assert create_diffusion("linear", 50, "learned_range", objective="hybrid", hybrid_weight=0.01).objective == \
        Hybrid(weight=0.01)
    with pytest.raises(ValueError, match="diffusion.hybrid_weight must be a finite number >= 0"):
        Hybrid(weight=-1.0)


def test_gaussian_diffusion_takes_objects_and_names_only_through_create_diffusion():
    betas = make_beta_schedule("linear", 50)
    assert GaussianDiffusion(betas).parameterization == Eps() and GaussianDiffusion(betas).objective == Simple()
    with pytest.raises(TypeError, match="create_diffusion also takes the names"):
        GaussianDiffusion(betas, parameterization="eps")
    with pytest.raises(ValueError, match=r"diffusion.objective\).*valid values are simple, vlb, hybrid"):
        create_diffusion("linear", 50, objective={"_target_": "not instantiated"})
    assert isinstance(GaussianDiffusion(betas).objective, Objective)
