"""Train a DDPM: `python -m src.train [experiment=cifar10] [group=value ...] [key=value ...]`."""

from __future__ import annotations

import logging
import signal
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def build(cfg: DictConfig, ckpt_path: str | None = None) -> dict[str, Any]:
    """Resolve the config, check the checkpoint to resume against it, then instantiate the data, the module, the
    callbacks, the loggers and the trainer (``src.config`` does every fill-in and check before anything is built)."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    from src.callbacks.resume import ExactResume
    from src.config import build_module, resolve_run_config
    from src.utils.instantiate import instantiate_callbacks, instantiate_loggers
    from src.utils.loggers import log_hyperparams
    from src.utils.progress import training_progress
    from src.utils.resume import check_resume_checkpoint

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    resolve_run_config(cfg, datamodule)
    run_config = OmegaConf.to_container(cfg, resolve=True)  # plain containers: checkpoints load weights_only
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, run_config)
    module = build_module(cfg, datamodule.data_shape)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), always=[ExactResume()])
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        # without one Lightning adds its epoch-counting Rich bar, also into log files
        callbacks.insert(0, training_progress())
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        log_hyperparams(logger, run_config)
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "callbacks": callbacks,
            "loggers": loggers, "run_config": run_config}


def resume_from(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from: a requeued SLURM job's newest, else ``ckpt_path`` resolved."""
    from pathlib import Path

    from src.utils.resume import checkpoint_dir, resolve_ckpt_path, run_dir_named, slurm_requeue_checkpoint

    checkpoints = checkpoint_dir(cfg)
    return (slurm_requeue_checkpoint(Path(cfg.paths.output_dir), checkpoints)
            or resolve_ckpt_path(cfg.get("ckpt_path"), checkpoints, run_dir_named=run_dir_named()))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the model; returns the objects and the final metrics."""
    from pathlib import Path

    from src.utils.checkpoint import read_checkpoint
    from src.utils.loggers import finish_wandb, record_checkpoint_path
    from src.utils.run_folder import mark_progress
    from src.utils.threads import keep_threads_of_run

    ckpt_path = resume_from(cfg) if cfg.get("train", True) else None
    if ckpt_path is not None and Path(ckpt_path).is_file():
        keep_threads_of_run(read_checkpoint(Path(ckpt_path), header_only=True).get("cpu_threads"))
    objects = build(cfg, ckpt_path)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("backbone %s: %s parameters; data shape %s; %s", type(module.net).__name__, f"{n_params:,}",
             datamodule.data_shape, module.diffusion)
    try:
        if cfg.get("train", True):
            try:
                # our checkpoints hold tensors and plain containers only
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            finally:
                if trainer.global_step > 0:  # the run folder holds training results: keep it even if fit failed
                    mark_progress()
            if trainer.is_global_zero:
                record_checkpoint_path(trainer.loggers, getattr(trainer.checkpoint_callback, "last_model_path", ""))
        if cfg.get("test", False):
            # after fit the module holds the EMA weights (the EMA callback copies them in at the end)
            trainer.test(module, datamodule=datamodule)
    finally:
        finish_wandb(trainer.loggers)
    objects["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("outputs in %s", trainer.default_root_dir)
    return objects


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from src.config import local_processes
    from src.utils.process import prepare_process

    prepare_process(local_processes(cfg.trainer), int(cfg.data.get("num_workers") or 0))
    try:
        metrics = train(cfg)["metrics"]
    except SIGTERMException as stop:
        # Lightning stops with a bare SystemExit (status 0); a stopped run must not look finished to a scheduler
        raise SystemExit(128 + signal.SIGTERM) from stop
    return optimized_metric(cfg, metrics)


def optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimizes (``optimized_metric``); a sweeper that optimizes gets a clear error when the
    run never logged it, rather than a failed trial without a reason."""
    from hydra.core.hydra_config import HydraConfig

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    if not HydraConfig.initialized() or getattr(HydraConfig.get().mode, "name", "") != "MULTIRUN":
        return None  # a single run: nobody optimizes over it
    sweeper = str(OmegaConf.select(HydraConfig.get(), "sweeper._target_") or "")
    message = (f"optimized_metric={name} was not logged by this run (logged: {', '.join(sorted(metrics)) or 'none'}); "
               "val/* metrics need a validation run: check trainer.max_steps against the epoch length and "
               "trainer.check_val_every_n_epoch")
    if "optuna" in sweeper.lower():
        raise ValueError(message)
    log.warning(message)
    return None


if __name__ == "__main__":
    main()
