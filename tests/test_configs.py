"""Every experiment and every config-group value composes and builds; bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from src.config import fill_model_from_data
from src.train import build
from tests.helpers import compose_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def group_values(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", group_values("experiment"))
def test_every_experiment_composes(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", tiny=False)
    assert cfg.diffusion.schedule and cfg.diffusion.variance
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.callbacks.ema.decay > 0.9


def test_cifar10_experiment_is_the_paper_recipe(compose_cfg):
    cfg = compose_cfg("experiment=cifar10", tiny=False)
    assert cfg.diffusion.num_timesteps == 1000
    assert cfg.diffusion.schedule == "linear" and cfg.diffusion.variance == "fixed_large"
    assert cfg.module.optimizer.lr == 2e-4 and cfg.module.warmup_steps == 5000
    assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.optimizer.eps == 1e-8
    assert cfg.data.batch_size == 128 and cfg.data.random_flip
    assert cfg.model.dropout == 0.1 and list(cfg.model.ch_mult) == [1, 2, 2, 2]
    assert cfg.callbacks.ema.decay == 0.9999
    assert cfg.trainer.max_steps == 800_000
    fill_model_from_data(cfg.model, (3, 32, 32))
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


GROUPS = ["data", "model", "diffusion/schedule", "diffusion/variance", "diffusion/parameterization",
          "diffusion/objective", "diffusion/table2", "trainer", "logger", "callbacks", "debug", "experiment"]


def instantiate_node(group: str, value: str, compose_cfg, tmp_path):
    """Compose ``group=value`` (with what that value needs to build here) and build what it selects."""
    import torch.nn as nn

    from src.config import check_accelerator, resolve_run_config, resolve_trainer_precision
    from src.utils.instantiate import instantiate_callbacks, instantiate_loggers

    extra = {("data", "image_folder"): [f"data.root={tmp_path / 'images'}", "data.upscale=true"],
             ("data", "cifar10"): [f"data.data_dir={tmp_path / 'cifar'}", "data.download=false"],
             ("data", "lsun"): [f"data.root={tmp_path / 'lsun'}"],
             ("data", "celebahq"): [f"data.root={tmp_path / 'images'}"],
             ("data", "shards"): [f"data.root={tmp_path / 'shards'}"],
             **{("experiment", name): ["data.root=/data"] for name in PAPER_256},
             ("model", "mlp"): ["data=toy2d"],
             ("diffusion/variance", "learned"): ["diffusion/objective=hybrid"],
             ("diffusion/variance", "learned_range"): ["diffusion/objective=hybrid"],
             ("diffusion/objective", "hybrid"): ["diffusion/variance=learned_range"],
             ("callbacks", "fid"): [f"+callbacks.fid.weights_path={tmp_path / 'inception.pth'}"]}
    prefix = "+" if group == "diffusion/table2" else ""
    cfg = compose_cfg(f"{prefix}{group}={value}", *extra.get((group, value), []), tiny=group != "experiment")
    if group == "data":
        return instantiate(cfg.data)
    if group in ("model", "debug", "experiment") or group.startswith("diffusion/"):
        resolve_run_config(cfg, machine=False)
        return instantiate(cfg.model) if group == "model" else instantiate(cfg.diffusion)
    if group == "trainer":
        resolve_trainer_precision(cfg.trainer)  # precision=auto is ours, not Lightning's
        try:
            check_accelerator(cfg.trainer)
        except RuntimeError as err:  # a GPU trainer on a machine without one: the clear error is the check
            assert "trainer=cpu" in str(err)
            return nn.Identity()
        return instantiate(cfg.trainer)
    if group == "logger":
        return instantiate_loggers(cfg.logger) or [None]
    return instantiate_callbacks(cfg.callbacks) or [None]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_value_builds(compose_cfg, group, tmp_path, monkeypatch):
    """Each value of each group composes and its node instantiates (the sampler group is src.sample's)."""
    from PIL import Image

    from src.metrics.fidelity import make_random_inception_weights

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    make_random_inception_weights(tmp_path / "inception.pth")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for value in group_values(group):
        assert instantiate_node(group, value, compose_cfg, tmp_path) is not None, f"{group}={value}"


def test_every_sampler_value_builds(tmp_path):
    from src.diffusion import Sampler

    for value in group_values("sampler"):
        cfg = compose_config([f"sampler={value}", "ckpt_path=x"], tmp_path, config_name="sample")
        assert isinstance(instantiate(cfg.sampler), Sampler), value


@pytest.mark.parametrize("schedule", group_values("diffusion/schedule"))
@pytest.mark.parametrize("variance", group_values("diffusion/variance"))
def test_diffusion_groups_build(compose_cfg, schedule, variance):
    # a learned variance is trained by the hybrid objective (simple gives it no gradient)
    objective = "hybrid" if variance.startswith("learned") else "simple"
    cfg = compose_cfg(f"diffusion/schedule={schedule}", f"diffusion/variance={variance}",
                      f"diffusion/objective={objective}")
    diffusion = instantiate(cfg.diffusion)
    assert diffusion.variance == variance and diffusion.num_timesteps == 50


@pytest.mark.parametrize("row", group_values("diffusion/table2"))
def test_table2_rows_build_with_the_right_output_channels(compose_cfg, row):
    module = build(compose_cfg(f"+diffusion/table2={row}"))["module"]
    parameterization, objective, variance = row.split("_")
    assert module.diffusion.parameterization.name == parameterization and module.diffusion.objective.name == objective
    assert module.diffusion.variance == ("learned" if variance == "learned" else "fixed_large")
    assert module.net.out_channels == (2 if variance == "learned" else 1)


@pytest.mark.parametrize("parameterization", group_values("diffusion/parameterization"))
def test_every_parameterization_builds_on_the_mlp_too(compose_cfg, parameterization):
    module = build(compose_cfg("experiment=toy2d", f"diffusion/parameterization={parameterization}"))["module"]
    assert module.diffusion.parameterization.name == parameterization and module.net.out_dim == 2


def test_learned_variance_with_simple_objective_says_what_to_use(compose_cfg):
    with pytest.raises(Exception, match="objective=hybrid"):
        build(compose_cfg("diffusion/variance=learned_range"))


def test_explicit_output_channels_that_do_not_fit_a_learned_variance(compose_cfg):
    with pytest.raises(ValueError, match="model.out_channels=1 but the network must output 2"):
        build(compose_cfg("diffusion/variance=learned_range", "diffusion/objective=hybrid", "model.out_channels=1"))


def test_bound_objectives_refuse_continuous_data(compose_cfg):
    with pytest.raises(ValueError, match="data toy2d is continuous"):
        build(compose_cfg("experiment=toy2d", "diffusion/objective=vlb"))


@pytest.mark.parametrize("experiment", ["digits", "toy2d"])
def test_build_wires_data_model_and_callbacks(compose_cfg, experiment):
    objects = build(compose_cfg(f"experiment={experiment}"))
    module, dm = objects["module"], objects["datamodule"]
    assert module.data_shape == tuple(dm.data_shape)
    # the EMA callback comes after the sampling callback (see SampleGrid)
    names = [type(cb).__name__ for cb in objects["callbacks"]]
    assert names.index("SampleGrid") < names.index("EMA") == len(names) - 1
    assert objects["run_config"]["diffusion"]["num_timesteps"] == 50
    # one process here: the global batch is the per-device one
    assert objects["run_config"]["world_size"] == 1
    assert objects["run_config"]["global_batch_size"] == dm.batch_size
    assert module.clip_denoised == (experiment == "digits")


def test_unknown_group_value_lists_the_options(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="fixed_large"):
        compose_cfg("diffusion/variance=fixed_medium")


def test_unknown_schedule_name_is_a_clear_error(compose_cfg):
    cfg = compose_cfg("diffusion.schedule=cosin")
    with pytest.raises(Exception, match="valid names are linear, cosine"):
        build(cfg)


def test_mismatched_channels_name_the_config_key(compose_cfg):
    with pytest.raises(ValueError, match="model.in_channels"):
        build(compose_cfg("model.in_channels=3"))


def test_image_backbone_on_points_is_a_clear_error(compose_cfg):
    with pytest.raises(ValueError, match="data has shape \\(2,\\)"):
        build(compose_cfg("experiment=toy2d", "model=unet_small"))


def test_vector_backbone_on_images_is_a_clear_error(compose_cfg):
    with pytest.raises(ValueError, match="model.data_dim"):
        build(compose_cfg("model=mlp"))


def test_image_size_that_does_not_fit_the_unet(compose_cfg):
    # Hydra wraps the backbone's ValueError; the message is what the user sees
    with pytest.raises(Exception, match="set model.resolution \\(= data.image_size\\) to a multiple of 4"):
        build(compose_cfg("data.image_size=10"))


def test_wandb_group_is_the_experiment_name(compose_cfg):
    from omegaconf import OmegaConf

    cfg = compose_cfg("experiment=toy2d", "logger=wandb")
    assert OmegaConf.to_container(cfg.logger, resolve=True)["wandb"]["group"] == "toy2d"


def test_wandb_online_without_credentials_says_what_to_do(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RuntimeError, match="wandb login.*WANDB_MODE=offline"):
        build(compose_cfg("logger=wandb"))


def test_callbacks_none_with_an_experiment_that_tunes_callbacks(compose_cfg, caplog):
    """Experiments (and debug=tiny) set callbacks.model_checkpoint.*: with callbacks=none those settings have no
    callback to go to and are ignored with a warning, not an error."""
    objects = build(compose_cfg("callbacks=none"))
    assert not any(type(cb).__name__ == "StepCheckpoint" for cb in objects["callbacks"])
    assert "callbacks.model_checkpoint has settings but no _target_" in caplog.text


# The paper's 256x256 runs (Ho et al. 2020, Appendix B and Table 3; the reference code's 256x256 settings)
PAPER_256 = {"celebahq256": ("src.data.ImageFolderDataModule", 500_000, True),
             "lsun_bedroom256": ("src.data.LSUNDataModule", 2_400_000, False),
             "lsun_church256": ("src.data.LSUNDataModule", 1_200_000, True),
             "lsun_cat256": ("src.data.LSUNDataModule", 1_800_000, True)}


@pytest.mark.parametrize("experiment", list(PAPER_256))
def test_256_presets_are_the_paper_recipe_key_by_key(compose_cfg, experiment):
    target, steps, flips = PAPER_256[experiment]
    cfg = compose_cfg(f"experiment={experiment}", "data.root=/data", tiny=False)
    # data: the dataset, 256x256, flips except on LSUN Bedroom, global batch 64 over the default 8 devices
    assert cfg.data._target_ == target and cfg.data.image_size == 256 and cfg.data.random_flip is flips
    assert cfg.trainer.strategy == "ddp" and cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 64
    # model: ch 128, ch_mult (1,1,2,2,4,4), 2 res-blocks, attention at 16x16, dropout 0: 113,673,219 parameters
    assert cfg.model._target_ == "src.models.unet.UNet" and cfg.model.ch == 128
    assert list(cfg.model.ch_mult) == [1, 1, 2, 2, 4, 4] and cfg.model.num_res_blocks == 2
    assert list(cfg.model.attn_resolutions) == [16] and cfg.model.dropout == 0.0
    fill_model_from_data(cfg.model, (3, 256, 256))
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == 113_673_219
    # diffusion: T = 1000, linear betas, epsilon prediction with L_simple, sigma_t^2 = tilde-beta_t
    assert cfg.diffusion.num_timesteps == 1000 and cfg.diffusion.schedule == "linear"
    assert cfg.diffusion.parameterization._target_ == "src.diffusion.parameterizations.Eps"
    assert cfg.diffusion.objective._target_ == "src.diffusion.objectives.Simple"
    assert cfg.diffusion.variance == "fixed_small"
    # optimization: Adam (TF defaults), lr 2e-5, 5000 warm-up steps, clipping at global norm 1, EMA 0.9999
    assert cfg.module.optimizer._target_ == "torch.optim.Adam" and cfg.module.optimizer.lr == 2e-5
    assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.optimizer.eps == 1e-8
    assert cfg.module.warmup_steps == 5000
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.gradient_clip_algorithm == "norm"
    assert cfg.callbacks.ema.decay == 0.9999
    assert cfg.trainer.max_steps == steps
    # sized for 256x256: a few samples per grid, a cheap FID estimate, both at each validation
    assert cfg.callbacks.sample_grid.num_samples <= 16 and cfg.callbacks.fid.num_samples <= 1000
    assert cfg.trainer.val_check_interval == 25_000


def test_256_presets_train_from_shards_with_their_flips_and_batch(compose_cfg):
    cfg = compose_cfg("experiment=lsun_bedroom256", "data=shards", "data.root=/shards", tiny=False)
    assert cfg.data._target_ == "src.data.ShardsDataModule" and cfg.data.random_flip is False
    assert cfg.data.batch_size == 8 and cfg.data.image_size == 256 and cfg.trainer.max_steps == 2_400_000
