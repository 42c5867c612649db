"""Train a DDPM: `python -m src.train [experiment=cifar10] [group=value ...] [key=value ...]`."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.utils.instantiate import fill_model_from_data, instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)


def log_hyperparams(logger, run_config: dict) -> None:
    """Send the resolved config to a logger; a W&B logger without credentials fails here, before training."""
    try:
        logger.log_hyperparams(run_config)
    except Exception as err:
        if type(err).__name__ == "UsageError" and type(err).__module__.startswith("wandb"):
            raise RuntimeError(
                f"W&B cannot start: {err}. Run `wandb login` or set WANDB_API_KEY; or log offline with "
                "WANDB_MODE=offline (sync later with `wandb sync`); or choose another logger (logger=csv)"
            ) from err
        raise


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data, backbone, diffusion, module, callbacks, loggers and trainer from the config."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    data_shape = tuple(datamodule.data_shape)
    fill_model_from_data(cfg.model, data_shape)
    net = instantiate(cfg.model)
    net.check_input_shape(data_shape)
    diffusion = instantiate(cfg.diffusion)
    # Plain containers only: checkpoints are loaded with weights_only=True.
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = instantiate(cfg.module, net=net, diffusion=diffusion, data_shape=data_shape)
    module.run_config = run_config  # set after instantiate, which would build the _target_s inside it
    if getattr(datamodule, "value_range", None) is None and module.clip_denoised:
        log.warning("data %s is unbounded: sampling without clipping x0 to [-1, 1] (module.clip_denoised=false)",
                    datamodule.name)
        module.clip_denoised = False
        run_config["module"]["clip_denoised"] = False  # so the checkpoint rebuilds the same module
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        log_hyperparams(logger, run_config)
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "callbacks": callbacks,
            "loggers": loggers, "run_config": run_config}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the model; returns the objects and the final metrics."""
    objects = build(cfg)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("backbone %s: %s parameters; data shape %s; %s", type(module.net).__name__, f"{n_params:,}",
             datamodule.data_shape, module.diffusion)
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            record_checkpoint_path(trainer)
        if cfg.get("test", False):
            # after fit the module holds the EMA weights (the EMA callback copies them in at the end)
            trainer.test(module, datamodule=datamodule)
    finally:
        finish_wandb(trainer)
    objects["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("outputs in %s", trainer.default_root_dir)
    return objects


def record_checkpoint_path(trainer: L.Trainer) -> None:
    """Put the newest checkpoint's path into the W&B run summary, so a dashboard row leads to its weights."""
    from lightning.pytorch.loggers import WandbLogger

    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
    if not path or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary["checkpoint_path"] = str(path)


def finish_wandb(trainer: L.Trainer) -> None:
    """Close the W&B run: otherwise the next job of a multirun, in the same process, would log into it."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)["metrics"]
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


if __name__ == "__main__":
    main()
