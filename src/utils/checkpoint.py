"""Rebuilding a trained model from a checkpoint written by ``src.train``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from src.config import build_module
from src.models.ddpm_module import DDPMModule

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", header_only: bool = False) -> dict:
    """A checkpoint written by this project (``src.train`` or ``src.convert``), read with ``weights_only=True``.

    ``header_only`` memory-maps the tensors instead of reading them: cheap, for looking at the config and step.
    Anything else (a text file, a torn download, another project's weights) is a ValueError that says so.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=header_only)
        except RuntimeError:
            if not header_only:
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=True)  # an old, unzipped format
    except Exception as err:  # torch raises many types for files that are not checkpoints
        raise ValueError(
            f"{path} cannot be read as a checkpoint of this project ({type(err).__name__}: {err}); "
            "pass a .ckpt written by `python -m src.train` (see <run folder>/checkpoints/)"
        ) from err
    if not isinstance(ckpt, dict) or "ddpm_config" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} was not written by `python -m src.train` (no 'ddpm_config' and 'state_dict'; found {keys}); "
            "weights from other projects need converting first (diffusers: `python -m src.convert`)"
        )
    return ckpt


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the highest step in ``folder``: ``last.ckpt``, unless a periodic one is newer (a process
    killed between writing ``step=N.ckpt`` and ``last.ckpt``). Ties go to ``last.ckpt``; None for no checkpoint."""
    candidates = []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            step = int(read_checkpoint(path, header_only=True).get("global_step", -1))
        except ValueError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        candidates.append((step, path.name == LAST, path))
    if not candidates:
        return None
    step, is_last, path = max(candidates)
    if not is_last and (folder / LAST).is_file():
        log.warning("%s holds step %d, newer than last.ckpt: using it", path.name, step)
    return path


def find_checkpoint(path: str | Path, key: str = "ckpt_path") -> Path:
    """The checkpoint file ``path`` names: a file, or a run folder of ``src.train`` or its ``checkpoints/`` folder
    (their newest checkpoint, normally ``last.ckpt``). FileNotFoundError naming ``key`` otherwise."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            newest = newest_checkpoint(folder) if folder.is_dir() else None
            if newest is not None:
                return newest
        found = sorted(p.name for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])[:5]
        hint = f" (it holds {', '.join(found)}, none readable as a checkpoint)" if found else ""
        raise FileNotFoundError(f"{key}={path} is a folder without checkpoints/last.ckpt or last.ckpt{hint}; pass a "
                                "run folder of `python -m src.train` or a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no checkpoint at {path}; pass a .ckpt file or a run folder of "
                                "`python -m src.train` (<run folder> means <run folder>/checkpoints/last.ckpt)")
    return path


def load_module(path: str | Path, map_location: str | torch.device = "cpu", weights: str = "ema",
                compile: bool | None = None, compile_options: dict | None = None) -> DDPMModule:
    """Load a ``DDPMModule`` from a checkpoint of this project, with the EMA (default) or the raw weights.

    The checkpoint is read with ``weights_only=True``: it holds tensors and the run config as plain
    containers, never pickled objects. ``compile`` overrides the run's ``module.compile`` (None keeps it):
    a model trained compiled need not pay a compile (minutes on a CPU) to draw a few samples.
    ``compile_options`` (None keeps the run's) replace ``module.compile_options``, e.g.
    ``{"mode": "reduce-overhead"}`` to replay each sampling step as a CUDA graph.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt = read_checkpoint(Path(path), map_location=map_location)
    cfg = OmegaConf.create(ckpt["ddpm_config"])
    if compile is not None:
        cfg.module.compile = bool(compile)
    if compile_options is not None:
        cfg.module.compile_options = compile_options
    module = build_module(cfg, ckpt.get("ddpm_data_shape"))
    module.run_config = ckpt["ddpm_config"]
    # with EMA, state_dict holds the average and current_model_state the raw weights
    state = ckpt["state_dict"] if weights == "ema" else ckpt.get("current_model_state", ckpt["state_dict"])
    module.load_state_dict(state)
    return module.eval()
