"""Shared fixtures: compose the real Hydra configs, forced onto the CPU and tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

# Overrides that make any experiment take seconds on a CPU.
TINY = [
    "trainer=cpu",
    "debug=tiny",
    "diffusion.num_timesteps=50",
    "data.num_workers=0",
    "logger=csv",
]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("DDPM_ROOT", str(tmp_path))


@pytest.fixture(autouse=True)
def _restore_global_rank():
    """A Trainer sets Lightning's process-wide rank (e.g. 3 under simulated SLURM variables), which would turn
    later rank-zero-only work (sample grids, files) into no-ops in the same pytest process."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    before = getattr(rank_zero_only, "rank", 0)
    yield
    rank_zero_only.rank = before


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> object:
    """Compose ``configs/<config_name>.yaml`` as ``python -m src.<config_name>`` would, with Hydra's runtime set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(*overrides: str, tiny: bool = True):
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path / "run")
    yield _compose
    GlobalHydra.instance().clear()


def write_untrained_checkpoint(run_dir: Path, *overrides: str) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` of an untrained tiny model, laid out as src.train writes it, in seconds:
    for tests of what the entry points accept, not of what a model learns."""
    import torch

    from src.train import build

    cfg = compose_config([*TINY, *overrides], run_dir)
    try:
        objects = build(cfg)
    finally:
        GlobalHydra.instance().clear()
    module = objects["module"]
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "ddpm_config": objects["run_config"],
                "ddpm_data_shape": list(module.data_shape)}, path)
    return path


def run_entry_point(module: str, *args: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run ``python -m <module> args`` in a fresh process (the real entry point) and return the result."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def write_fake_cifar10(root: Path, per_batch: int = 8) -> Path:
    """Write a tiny ``cifar-10-batches-py`` in the real on-disk format (pickled dicts, uint8 rows of 3072)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": labels, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small sequential ops: two threads on two cores shared with
    other processes spin against each other and run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights_and_ema(got: dict, want: dict) -> None:
    """Two checkpoints hold bit-identical raw and EMA weights at the same step and EMA update count."""
    import torch

    assert got["global_step"] == want["global_step"]
    for key in ("state_dict", "current_model_state"):  # the EMA and the raw weights
        assert got[key].keys() == want[key].keys()
        different = [k for k in want[key] if not torch.equal(got[key][k], want[key][k])]
        assert not different, f"{key}: {different[:5]}"
    assert int(got["averaging_state"]["n_averaged"]) == int(want["averaging_state"]["n_averaged"])


def run_whole_and_split(tmp_path: Path, common: list[str], total: int, split: int) -> tuple[dict, dict]:
    """Train ``total`` steps in one run, and ``split`` steps + a restart from last.ckpt + the rest in another,
    through the entry point; returns both final last.ckpt contents (whole, split)."""
    runs = {"whole": [[f"trainer.max_steps={total}"]],
            "split": [[f"trainer.max_steps={split}"], [f"trainer.max_steps={total}", "ckpt_path=last"]]}
    ckpts = {}
    for name, parts in runs.items():
        for extra in parts:
            result = run_entry_point("src.train", *common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
        ckpts[name] = load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
    return ckpts["whole"], ckpts["split"]
