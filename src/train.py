"""Train a DDPM: `python -m src.train [experiment=cifar10] [group=value ...] [key=value ...]`."""

from __future__ import annotations

import logging
import signal
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def build(cfg: DictConfig, ckpt_path: str | None = None) -> dict[str, Any]:
    """Instantiate data, backbone, diffusion, module, callbacks, loggers and trainer from the config.

    Everything that can be checked without building the network and the trainer is checked first: the config's
    values, the machine (a GPU for ``trainer.accelerator=gpu``) and the checkpoint to resume (``ckpt_path``).
    """
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    from src.callbacks.resume import ExactResume
    from src.utils.instantiate import (
        fill_model_from_data,
        fill_model_num_classes,
        instantiate_callbacks,
        instantiate_loggers,
    )
    from src.utils.loggers import fall_back_to_offline_wandb, log_hyperparams
    from src.utils.progress import training_progress
    from src.utils.resume import check_resume_checkpoint

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    data_shape = tuple(datamodule.data_shape)
    diffusion = instantiate(cfg.diffusion)
    fill_model_from_data(cfg.model, data_shape, diffusion.output_channels_factor, diffusion.variance)
    # class conditioning (conditional=true): model.num_classes follows from the data's labels
    fill_model_num_classes(cfg.model, bool(cfg.get("conditional", False)), datamodule.num_classes, datamodule.name)
    resolve_trainer_precision(cfg.trainer)
    check_accelerator(cfg.trainer)
    bounded = getattr(datamodule, "value_range", None) is not None
    if not bounded and diffusion.objective.discrete_data:
        raise ValueError(
            f"diffusion.objective={diffusion.objective.name} uses the discretized decoder of 8-bit data on [-1, 1] at "
            f"t=1, but data {datamodule.name} is continuous: use diffusion/objective=simple (with a fixed variance)")
    if not bounded and cfg.module.clip_denoised:
        log.warning("data %s is unbounded: sampling without clipping x0 to [-1, 1] (module.clip_denoised=false)",
                    datamodule.name)
        cfg.module.clip_denoised = False  # so the checkpoint rebuilds the same module
    fall_back_to_offline_wandb(cfg.get("logger"))
    # Plain containers only: checkpoints are loaded with weights_only=True.
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, run_config)
    net = instantiate(cfg.model)
    net.check_input_shape(data_shape)
    module = instantiate(cfg.module, net=net, diffusion=diffusion, data_shape=data_shape)
    module.run_config = run_config  # set after instantiate, which would build the _target_s inside it
    callbacks = instantiate_callbacks(cfg.get("callbacks"), always=[ExactResume()])
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        # without one Lightning adds its epoch-counting Rich bar, also into log files
        callbacks.insert(0, training_progress())
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
    import torch

    from src.utils.device import has_fast_bf16

    if trainer_cfg.get("precision") != "auto":
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    bf16 = on_cuda and has_fast_bf16(torch.device("cuda"))
    trainer_cfg.precision = "bf16-mixed" if bf16 else "32-true"
    log.info("trainer.precision=auto -> %s", trainer_cfg.precision)


def local_processes(trainer_cfg: DictConfig) -> int:
    """Training processes this node runs: one per device (``trainer.devices``; ``auto``: every GPU, else one)."""
    import torch

    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) or str(devices).isdigit():
        return max(1, int(devices))
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return max(1, len(devices))
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
    return max(1, torch.cuda.device_count()) if on_gpu and torch.cuda.is_available() else 1


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: say how to train on the CPU instead of Lightning's backend error."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if accelerator == "cuda" or torch.cuda.is_available() else 0
    if not available and accelerator == "gpu" and torch.backends.mps.is_available():
        available = 1
    devices = trainer_cfg.get("devices", 1)
    wanted = int(devices) if str(devices).isdigit() else 1
    if available >= wanted:
        return
    have = "no GPU" if not available else f"{available} GPU(s)"
    raise RuntimeError(
        f"trainer.accelerator={accelerator} with trainer.devices={devices}, but this machine has {have} "
        f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}). Train on the CPU with trainer=cpu "
        "(or trainer.accelerator=cpu; slow for the paper-size U-Net), or lower trainer.devices")


def record_world(run_config: dict, trainer: Any, datamodule: Any) -> None:
    """Put the process count and the global batch into the run's config (and so into every logger and checkpoint):
    ``data.batch_size`` is per device, the learning rate is not rescaled, EMA decays once per optimizer step."""
    world_size = int(trainer.num_devices) * int(trainer.num_nodes)
    run_config["world_size"] = world_size
    batch_size = getattr(datamodule, "batch_size", None)
    if batch_size is not None:
        run_config["global_batch_size"] = int(batch_size) * world_size * int(trainer.accumulate_grad_batches)


def resume_from(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from: a requeued SLURM job's newest, else ``ckpt_path`` resolved."""
    from pathlib import Path

    from src.utils.resume import checkpoint_dir, resolve_ckpt_path, run_dir_named, slurm_requeue_checkpoint

    checkpoints = checkpoint_dir(cfg)
    return (slurm_requeue_checkpoint(Path(cfg.paths.output_dir), checkpoints)
            or resolve_ckpt_path(cfg.get("ckpt_path"), checkpoints, run_dir_named=run_dir_named()))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the model; returns the objects and the final metrics."""
    from src.utils.loggers import finish_wandb, record_checkpoint_path
    from src.utils.run_folder import mark_progress

    ckpt_path = resume_from(cfg) if cfg.get("train", True) else None
    objects = build(cfg, ckpt_path)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("backbone %s: %s parameters; data shape %s; %s", type(module.net).__name__, f"{n_params:,}",
             datamodule.data_shape, module.diffusion)
    try:
        if cfg.get("train", True):
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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

    from src.utils.quiet import silence_library_noise
    from src.utils.threads import configure_threads

    silence_library_noise()
    configure_threads(local_processes(cfg.trainer), int(cfg.data.get("num_workers") or 0))
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
