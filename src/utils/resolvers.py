"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def run_group(experiment_name: str) -> str:
    """The W&B group of a run: the experiment's name, or in a multirun the sweep's, so a sweep sits together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"{experiment_name}-sweep-{Path(hydra_cfg.sweep.dir).name}"
    return experiment_name


def slurm_count(value, key: str) -> int:
    """A whole number for an sbatch resource (``--nodes``, ``--ntasks-per-node``, ``--gpus-per-node``), from ``key``.

    SLURM needs counts up front: Lightning's ``devices=auto`` means nothing to sbatch.
    """
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key}={value!r} cannot be requested from SLURM (hydra/launcher=slurm): set it to a "
                         f"whole number, e.g. {key}=4")
    return int(text)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_group"):
        OmegaConf.register_new_resolver("run_group", run_group)
    if not OmegaConf.has_resolver("slurm_count"):
        OmegaConf.register_new_resolver("slurm_count", slurm_count)
