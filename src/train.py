"""Train a DDPM: `python -m src.train [experiment=cifar10] [group=value ...] [key=value ...]`."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from src.callbacks.resume import ExactResume
from src.utils.checkpoint import find_checkpoint
from src.utils.device import has_fast_bf16
from src.utils.instantiate import (
    fill_model_from_data,
    fill_model_num_classes,
    instantiate_callbacks,
    instantiate_loggers,
)

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
    diffusion = instantiate(cfg.diffusion)
    fill_model_from_data(cfg.model, data_shape, diffusion.output_channels_factor, diffusion.variance)
    # class conditioning (conditional=true): model.num_classes follows from the data's labels
    fill_model_num_classes(cfg.model, bool(cfg.get("conditional", False)), datamodule.num_classes, datamodule.name)
    net = instantiate(cfg.model)
    net.check_input_shape(data_shape)
    resolve_trainer_precision(cfg.trainer)
    # Plain containers only: checkpoints are loaded with weights_only=True.
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = instantiate(cfg.module, net=net, diffusion=diffusion, data_shape=data_shape)
    module.run_config = run_config  # set after instantiate, which would build the _target_s inside it
    if getattr(datamodule, "value_range", None) is None and diffusion.objective != "simple":
        raise ValueError(
            f"diffusion.objective={diffusion.objective} uses the discretized decoder of 8-bit data on [-1, 1] at "
            f"t=1, but data {datamodule.name} is continuous: use diffusion/objective=simple (with a fixed variance)")
    if getattr(datamodule, "value_range", None) is None and module.clip_denoised:
        log.warning("data %s is unbounded: sampling without clipping x0 to [-1, 1] (module.clip_denoised=false)",
                    datamodule.name)
        module.clip_denoised = False
        run_config["module"]["clip_denoised"] = False  # so the checkpoint rebuilds the same module
    callbacks = instantiate_callbacks(cfg.get("callbacks"), always=[ExactResume()])
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    record_world(run_config, trainer, datamodule)
    for logger in loggers:
        log_hyperparams(logger, run_config)
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "callbacks": callbacks,
            "loggers": loggers, "run_config": run_config}


def resolve_trainer_precision(trainer_cfg: DictConfig) -> None:
    """``trainer.precision=auto``: bf16-mixed when training on CUDA GPUs with bf16 (Ampere on), else 32-true.

    Resolved in the config itself, so the run's config and checkpoints record what actually ran. CPUs train in
    32-true: CPU runs are for small models and tests, where bit-for-bit reproducible fp32 matters more.
    """
    if trainer_cfg.get("precision") != "auto":
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    bf16 = on_cuda and has_fast_bf16(torch.device("cuda"))
    trainer_cfg.precision = "bf16-mixed" if bf16 else "32-true"
    log.info("trainer.precision=auto -> %s", trainer_cfg.precision)


def record_world(run_config: dict, trainer: L.Trainer, datamodule) -> None:
    """Put the process count and the global batch into the run's config (and so into every logger and checkpoint):
    ``data.batch_size`` is per device, the learning rate is not rescaled, EMA decays once per optimizer step."""
    world_size = int(trainer.num_devices) * int(trainer.num_nodes)
    run_config["world_size"] = world_size
    batch_size = getattr(datamodule, "batch_size", None)
    if batch_size is not None:
        run_config["global_batch_size"] = int(batch_size) * world_size * int(trainer.accumulate_grad_batches)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the model; returns the objects and the final metrics."""
    objects = build(cfg)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("backbone %s: %s parameters; data shape %s; %s", type(module.net).__name__, f"{n_params:,}",
             datamodule.data_shape, module.diffusion)
    try:
        if cfg.get("train", True):
            ckpt_path = slurm_requeue_checkpoint(trainer) or resolve_ckpt_path(
                cfg.get("ckpt_path"), trainer, run_dir_named=run_dir_named())
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            record_checkpoint_path(trainer)
        if cfg.get("test", False):
            # after fit the module holds the EMA weights (the EMA callback copies them in at the end)
            trainer.test(module, datamodule=datamodule)
    finally:
        finish_wandb(trainer)
    objects["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("outputs in %s", trainer.default_root_dir)
    return objects


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer, run_dir_named: bool) -> str | None:
    """The checkpoint that ``ckpt_path`` names, checked before training starts.

    ``last`` is ``last.ckpt`` in THIS run's checkpoint folder; since every run gets a new folder, it finds one only
    when the run folder is named (``hydra.run.dir=<old run folder>``). Lightning would silently start from
    scratch when there is none; here that happens only when the folder was named (a job that is requeued passes
    ``ckpt_path=last`` every time, also the first), otherwise it is an error saying how to resume. A folder means
    its ``checkpoints/last.ckpt``. ``best``, ``hpc`` and ``registry`` go to Lightning as they are.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or ckpt.dirpath is None:
            raise ValueError("ckpt_path=last needs the model_checkpoint callback (callbacks=default); "
                             "pass ckpt_path=<file> instead")
        last = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if last.is_file():
            return str(last)
        if run_dir_named:
            log.warning("ckpt_path=last: no %s yet, training starts at step 0", last)
            return None
        raise FileNotFoundError(
            f"ckpt_path=last means last.ckpt in this run's folder, and this run is new ({last.parent} has none). "
            "Resume an earlier run with ckpt_path=<run folder>/checkpoints/last.ckpt (or ckpt_path=<run folder>), "
            "or continue in its folder with hydra.run.dir=<run folder> ckpt_path=last"
        )
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return ckpt_path
    return str(find_checkpoint(ckpt_path, key="ckpt_path"))


def slurm_requeue_checkpoint(trainer: L.Trainer) -> str | None:
    """In a SLURM job that was requeued (time limit or preemption), the newest checkpoint that its earlier attempts
    left in the run folder; otherwise None.

    A requeued submitit job re-runs the same pickled job, so it has the same run folder. There, Lightning's
    auto-requeue wrote ``hpc_ckpt_<n>.ckpt`` on the USR1 signal (configs/hydra/launcher/slurm.yaml), and
    ``checkpoints/last.ckpt`` is the periodic one, also written on SIGTERM. The newer file wins, over ``ckpt_path``
    too: that only said where the first attempt started.
    """
    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    candidates = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath is not None:
        candidates.append(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}")
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        log.warning("SLURM job %s was requeued but %s holds no checkpoint: training starts as the first attempt did",
                    os.environ.get("SLURM_JOB_ID"), trainer.default_root_dir)
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    log.info("SLURM job %s, restart %s: resuming from %s", os.environ.get("SLURM_JOB_ID"),
             os.environ["SLURM_RESTART_COUNT"], newest)
    return str(newest)


def run_dir_named() -> bool:
    """Whether the command line chose the run folder (hydra.run.dir / hydra.sweep.dir) rather than a new one."""
    if not HydraConfig.initialized():
        return False
    keys = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.hydra}
    return bool(keys & {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"})


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
    try:
        metrics = train(cfg)["metrics"]
    except SIGTERMException as stop:
        # Lightning stops with a bare SystemExit (status 0); a stopped run must not look finished to a scheduler
        raise SystemExit(128 + signal.SIGTERM) from stop
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


if __name__ == "__main__":
    main()
