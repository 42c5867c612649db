"""Rebuilding a trained model from a checkpoint written by ``src.train``."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.models.ddpm_module import DDPMModule


def find_checkpoint(path: str | Path, key: str = "ckpt_path") -> Path:
    """The checkpoint file ``path`` names: a file, or a run folder of ``src.train`` (its ``checkpoints/last.ckpt``),
    or that run's ``checkpoints/`` folder (its ``last.ckpt``). FileNotFoundError naming ``key`` otherwise."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(p.name for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])[:5]
        hint = f" (it holds {', '.join(found)}: pass one of them as {key}=<file>)" if found else ""
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read as a checkpoint of this project ({type(err).__name__}: {err}); "
            "pass a .ckpt written by `python -m src.train` (see <run folder>/checkpoints/)"
        ) from err
    if not isinstance(ckpt, dict) or "ddpm_config" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} was not written by `python -m src.train` (no 'ddpm_config' and 'state_dict'; found {keys}); "
            "weights from other projects need converting first"
        )
    cfg = OmegaConf.create(ckpt["ddpm_config"])
    if compile is not None:
        cfg.module.compile = bool(compile)
    if compile_options is not None:
        cfg.module.compile_options = compile_options
    module = instantiate(cfg.module, net=instantiate(cfg.model), diffusion=instantiate(cfg.diffusion),
                         data_shape=ckpt.get("ddpm_data_shape"))
    module.run_config = ckpt["ddpm_config"]
    # with EMA, state_dict holds the average and current_model_state the raw weights
    state = ckpt["state_dict"] if weights == "ema" else ckpt.get("current_model_state", ckpt["state_dict"])
    module.load_state_dict(state)
    return module.eval()
