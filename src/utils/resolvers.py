"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# The file that marks the project's root folder (the template's convention): run folders and data go below it.
ROOT_MARKER = ".project-root"


def project_root() -> str:
    """Where ``outputs/`` and ``data/`` live: ``$DDPM_ROOT`` if set, else the nearest folder at or above the
    working directory holding ``.project-root`` (a clone of this repository), else the working directory.

    Found from the environment and the file system alone, so it resolves at any time: ``${hydra:runtime.cwd}``
    is unset while Hydra resolves ``hydra.sweep.dir``, which made every multirun fail before its first job.
    """
    if os.environ.get("DDPM_ROOT"):
        return str(Path(os.environ["DDPM_ROOT"]).expanduser().resolve())
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / ROOT_MARKER).is_file():
            return str(folder)
    return str(cwd)


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


def slurm_resource(name: str, *, _root_) -> int:
    """``devices`` or ``num_nodes`` for sbatch, from ``trainer.<name>`` (src.train) or ``<name>`` (src.sample,
    src.eval); num_nodes defaults to 1."""
    for key in (f"trainer.{name}", name):
        value = OmegaConf.select(_root_, key, default=None)
        if value is not None:
            return slurm_count(value, key)
    if name == "num_nodes":
        return 1
    raise ValueError("hydra/launcher=slurm needs a whole number of devices: set trainer.devices (src.train) or "
                     "devices (src.sample, src.eval), e.g. devices=4")


def first_set(*values):
    """The first of ``values`` that is not null (``${first_set:${oc.select:out_dir,null},<default>}``: a key that
    may be missing or null, else a default; ``oc.select`` alone returns a null that is set)."""
    return next((v for v in values if v is not None), None)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root, use_cache=True)
    if not OmegaConf.has_resolver("run_group"):
        OmegaConf.register_new_resolver("run_group", run_group)
    if not OmegaConf.has_resolver("slurm_count"):
        OmegaConf.register_new_resolver("slurm_count", slurm_count)
    if not OmegaConf.has_resolver("slurm_resource"):
        OmegaConf.register_new_resolver("slurm_resource", slurm_resource)
    if not OmegaConf.has_resolver("first_set"):
        OmegaConf.register_new_resolver("first_set", first_set)
