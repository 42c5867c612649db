"""Bad input to `python -m src.train` is caught before anything is built, with what to do."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from src.train import build, train
from src.utils.resume import check_resume_checkpoint
from tests.helpers import TINY, compose_config


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> str:
    """last.ckpt of a 2-step digits run (T=50), trained in-process."""
    run = tmp_path_factory.mktemp("digits") / "run"
    cfg = compose_config([*TINY, "trainer.max_steps=2", "callbacks.sample_grid=null"], run)
    train(cfg)
    return str(run / "checkpoints" / "last.ckpt")


def run_config(*overrides: str, tmp_path) -> dict:
    """The resolved run config of ``overrides``, as src.train checks a checkpoint against it."""
    from omegaconf import OmegaConf

    from src.config import resolve_run_config

    cfg = compose_config([*TINY, *overrides], tmp_path / "new")
    return OmegaConf.to_container(resolve_run_config(cfg, machine=False), resolve=True)


def test_a_text_file_as_checkpoint_fails_before_training(compose_cfg, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="cannot be read as a checkpoint of this project"):
        train(compose_cfg(f"ckpt_path={notes}"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was built or written


def test_another_models_checkpoint_names_the_differing_keys(digits_checkpoint, tmp_path):
    cfg = run_config("experiment=toy2d", tmp_path=tmp_path)
    with pytest.raises(ValueError, match=r"other settings than this run: model\._target_: checkpoint "
                                         r"'src\.models\.unet\.UNet', this run 'src\.models\.mlp\.TimeMLP'"):
        check_resume_checkpoint(digits_checkpoint, cfg)


def test_another_number_of_timesteps_is_refused(digits_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="diffusion.num_timesteps: checkpoint 50, this run 100.*leave ckpt_path unset"):
        check_resume_checkpoint(digits_checkpoint, run_config("diffusion.num_timesteps=100", tmp_path=tmp_path))
    # the same settings resume; a changed batch size is allowed and named (this run's value is used)
    check_resume_checkpoint(digits_checkpoint, run_config(tmp_path=tmp_path))


def test_other_data_settings_are_allowed_with_a_warning(digits_checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        check_resume_checkpoint(digits_checkpoint, run_config("data.batch_size=32", tmp_path=tmp_path))
    assert "data.batch_size: checkpoint 128, this run 32" in caplog.text and "This run's values are used" in caplog.text


def test_a_checkpoint_of_the_old_names_resumes_into_a_run_of_the_objects(digits_checkpoint, tmp_path):
    """Checkpoints written before parameterizations and objectives were _target_ objects store their names
    (``diffusion.parameterization: eps``): the same settings, so they resume; other ones are named."""
    from src.diffusion import Eps, Simple
    from src.utils.checkpoint import load_module

    ckpt = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    diffusion = ckpt["ddpm_config"]["diffusion"]
    assert diffusion["parameterization"] == {"_target_": "src.diffusion.parameterizations.Eps"}
    diffusion.update(parameterization="eps", objective="simple")
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    check_resume_checkpoint(str(old), run_config(tmp_path=tmp_path))
    module = load_module(old)
    assert (module.diffusion.parameterization, module.diffusion.objective) == (Eps(), Simple())

    diffusion["parameterization"] = "x0"
    torch.save(ckpt, old)
    with pytest.raises(ValueError, match=r"diffusion.parameterization._target_: checkpoint "
                                         r"'src.diffusion.parameterizations.X0', this run "
                                         r"'src.diffusion.parameterizations.Eps'"):
        check_resume_checkpoint(str(old), run_config(tmp_path=tmp_path))


def test_weights_without_training_state_cannot_be_resumed(digits_checkpoint, tmp_path):
    ckpt = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    weights_only = {k: ckpt[k] for k in ("state_dict", "ddpm_config", "ddpm_data_shape")}  # as src.convert writes
    path = tmp_path / "converted.ckpt"
    torch.save(weights_only, path)
    with pytest.raises(ValueError, match="no training state.*python -m src.sample"):
        check_resume_checkpoint(str(path), run_config(tmp_path=tmp_path))


def test_gpu_trainer_without_a_gpu_says_to_use_the_cpu(compose_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="this machine has no GPU.*trainer=cpu"):
        build(compose_cfg("trainer=gpu"))
    with pytest.raises(RuntimeError, match="trainer.accelerator=gpu"):
        build(compose_cfg("experiment=cifar10", tiny=False))


def test_wandb_with_a_key_but_no_server_falls_back_to_offline(compose_cfg, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    import wandb

    from src.utils.loggers import finish_wandb

    wandb.teardown()  # what earlier tests of this process set up
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            objects = build(compose_cfg("logger=wandb"))
        assert time.monotonic() - start < 60
        assert "W&B server unreachable" in caplog.text and "wandb sync" in caplog.text
        assert objects["run_config"]["logger"]["wandb"]["offline"] is True
        assert objects["loggers"][0].experiment.settings.mode == "offline"
        finish_wandb(objects["loggers"])
    finally:
        wandb.teardown()  # wandb keeps the key it saw for the rest of the process


def test_saving_and_resuming_pass_weights_only(tmp_path, caplog):
    """Lightning logs "`weights_only` was not set" when a save or a load leaves it to its default."""
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train(compose_config([*TINY, "trainer.max_steps=2", "callbacks.sample_grid=null"], run))
        train(compose_config([*TINY, "trainer.max_steps=3", "callbacks.sample_grid=null", "ckpt_path=last",
                              f"hydra.run.dir={run}"], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "weights_only` was not set" not in caplog.text
